"""skill-edge: an edge runtime for Shared Knowledge Lifelong Learning (SKILL).

``skill_edge.export`` is the factory (backbone -> ROM), ``skill_edge.runtime`` the device
(learn, bank, classify, packets, sync) and ``skill_edge.firmware_sim`` the fleet lab.
"""

__version__ = "0.1.0"
