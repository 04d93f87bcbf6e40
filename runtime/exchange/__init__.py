"""How knowledge crosses devices: the signed packet format (``packet``) and its byte-budget codec
(``codec``), device keys and trust (``keys``), the newest seq the key signed per task (``seq_ledger``), the acceptance policy (``receive``), and sync over a
``transport`` (shared folder or MQTT).  Nothing here unpickles.
"""
