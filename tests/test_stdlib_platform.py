"""platform/ is a folder, not a package: `import platform` must stay the standard library's."""

import sys
import sysconfig
from pathlib import Path


def test_import_platform_is_the_standard_library():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.system) and platform.python_version() == ".".join(map(str, sys.version_info[:3]))


def test_platform_folder_has_no_init():
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "platform" / "deconvlab" / "__init__.py").is_file()
    assert not (repo / "platform" / "__init__.py").exists()
