"""What a device knows: the typed ``TaskKnowledge`` record (``records``), its fleet-wide identity
(``identity``) and the crash-safe bank that stores it (``bank``).
"""
