#!/usr/bin/env bash
# Run ansible-test (sanity or units) on a copy of the collection, offline.
#   tools/ansible-test.sh sanity [extra ansible-test args...]
#   tools/ansible-test.sh units  [extra ansible-test args...]
#
# Why a copy: ansible-test needs the collection at
# .../ansible_collections/haven/dr/ as a real directory. The copy lives
# outside this git repository: inside one, ansible-test lists files through
# git and would see the repo root instead of the collection.
#
# What the copy holds: the collection content that git tracks or would track
# (plugins, roles, playbooks, meta, docs, changelogs, tests/unit,
# tests/integration, extensions). Left out on purpose:
#   service/, tests/service/, bench/ - havend is a separate Python 3.11+
#       service with its own ruff lint and pytest suite; ansible-test's
#       pylint/compile rules for the Pythons that modules must support do
#       not apply to it (it still ships in the tarball, see galaxy.yml).
#   tools/, .ci/ - developer scripts, not collection content.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv
dest=${XDG_CACHE_HOME:-$HOME/.cache}/haven-dr/ansible_collections/haven/dr
export PATH=$venv/bin:$PATH

# 1. get-pip stand-in, under the name this ansible-test version looks for.
#    The pip version is read from ansible-test's own source (24.2 for 2.19).
at_dir=$("$venv/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')
pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',*$/\1/p" "$at_dir/_internal/python_requirements.py" | head -n1)
if [[ -z $pip_version ]]; then
    echo "tools/ansible-test.sh: cannot find ansible-test's pip version; update this script" >&2
    exit 1
fi
getpip=$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py
mkdir -p "$(dirname "$getpip")"
cmp -s "$root/tools/get_pip_standin.py" "$getpip" || cp "$root/tools/get_pip_standin.py" "$getpip"

# 2. Sync the copy. rsync filter: every listed file plus its parent dirs,
#    nothing else; --delete-excluded removes files deleted from the repo;
#    the copy's own tests/output/ (ansible-test results) is protected.
rules=$(mktemp)
trap 'rm -f "$rules"' EXIT
echo 'P /tests/output/' >"$rules"
(cd "$root" && git ls-files -co --exclude-standard) |
    grep -v -E '^(service|bench|tools|\.ci|tests/service)/' |
    awk '{ n = split($0, p, "/"); d = ""
           for (i = 1; i < n; i++) { d = d "/" p[i]; if (!(d in seen)) { seen[d] = 1; print "+ " d "/" } }
           print "+ /" $0 }' >>"$rules"
echo '- *' >>"$rules"
mkdir -p "$dest"
rsync -a --delete --delete-excluded --filter="merge $rules" "$root/" "$dest/"

# 3. Run it. --venv: requirements go into ansible-test's own venvs
#    (~/.ansible/test/venv), built on first use (slow once, reused after).
cd "$dest"
exec ansible-test "$@" --venv --python 3.11
