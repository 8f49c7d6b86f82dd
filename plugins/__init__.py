"""peftlab's built-in plugins, installed as ``peftlab_plugins``.

Each module is one plugin family, registered in ``pyproject.toml`` under
``[project.entry-points.peftlab]`` exactly as a third-party plugin would be.
"""
