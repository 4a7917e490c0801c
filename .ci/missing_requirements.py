"""Print the requirements of this project (and the named extras) that are not installed, one
quoted word each, for `pip install`: nothing printed means set-up can stay offline."""

import re
import sys
from importlib import metadata

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def requirements(extras):
    text = open("pyproject.toml", encoding="utf-8").read()
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        reqs = list(project.get("dependencies", []))
        for extra in extras:
            reqs += project.get("optional-dependencies", {}).get(extra, [])
        return reqs
    # 3.10 without tomli: the lists are one-line arrays of strings in this pyproject.toml
    reqs = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*)\]$", text, re.M).group(1))
    for extra in extras:
        line = re.search(rf"^{re.escape(extra)} = \[(.*)\]$", text, re.M)
        reqs += re.findall(r'"([^"]+)"', line.group(1)) if line else []
    return reqs


def satisfied(req):
    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req).groups()
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True  # installed; without packaging the minimum is not checked
    return SpecifierSet(spec).contains(version, prereleases=True)


if __name__ == "__main__":
    print(" ".join(req for req in requirements(sys.argv[1:]) if not satisfied(req)))
