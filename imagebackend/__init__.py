"""imagebackend: turn images into instance disks through a shared cache."""

import pbr.version

__version__ = pbr.version.VersionInfo("imagebackend").version_string()
