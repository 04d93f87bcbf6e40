"""The ROM on the device: verify a burned-in ROM, preprocess images, extract features (and cache them).

Image → ``Preprocessing`` → ``RomEngine`` (trunk, tail, bias inputs) → ``Extraction``; ``FeatureCache``
keeps features per ROM fingerprint so a task is never extracted twice.
"""
