"""Where a device's images come from: an ImageFolder directory or a camera (``--camera`` URIs).
"""
