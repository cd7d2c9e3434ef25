"""Offline stand-in for pip's get-pip.py, used by ansible-test.

ansible-test bootstraps pip into each of its venvs by downloading get-pip.py
from ci-files.testing.ansible.com, which CI cannot reach. tools/ansible-test.sh
copies this file to the cache path ansible-test checks first
(~/.ansible/test/cache/get_pip_<version>.py). ansible-test runs it as
`python get_pip.py [pip options] pip==X.Y --no-setuptools --no-wheel`;
we bootstrap pip from the interpreter's bundled wheel (ensurepip) and then let
that pip install the requested packages from the configured index.
"""

import subprocess
import sys

# These two are options of get-pip itself, not of `pip install`.
GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
    subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True)
    return subprocess.run([sys.executable, "-m", "pip", "install", "--upgrade", *args]).returncode


if __name__ == "__main__":
    sys.exit(main())
