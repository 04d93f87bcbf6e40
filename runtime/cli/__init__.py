"""The device's verbs (``skill-edge learn``, ``classify``, ``eval``, ``bank``, ``keys``, ``packet``,
``sync``): thin typer commands over ``runtime.device`` and ``runtime.exchange``, with shared output
helpers (``output``).  ``skill_edge/cli.py`` imports each module only when its verb runs.
"""
