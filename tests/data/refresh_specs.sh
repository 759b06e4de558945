#!/usr/bin/env bash
# Refresh tests/data/specs from the project's shared specs (a folder beside the clone, on the
# developers' machines only). Users never need this: the copy in the repository is what the tests read.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${1:-$here/../../../shared/specs}"
[ -d "$src" ] || { echo "refresh_specs.sh: no specs folder at $src (pass its path)" >&2; exit 2; }
rm -rf "$here/specs.new"
cp -r "$src" "$here/specs.new"
chmod -R u+w "$here/specs.new"
rm -rf "$here/specs"
mv "$here/specs.new" "$here/specs"
echo "tests/data/specs refreshed from $src; run python -m pytest -q, then commit"
