"""What a device learns for its own task from ROM features: the linear head (``head``) and, with the
``[bb]`` extra, beneficial biases trained through a suffix of the backbone (``bb``).
"""
