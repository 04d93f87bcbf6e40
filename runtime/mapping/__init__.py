"""Task anchors and the task mapper built from them: fit a task's GMMC/Mahalanobis anchor (``anchors``,
``gmm``), route an input to a task with no oracle (``mapper``), and check a received task's anchor
against the bank before it is trusted (``plausibility``).
"""
