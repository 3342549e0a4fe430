#!/usr/bin/env bash
# Installs what the notebook test needs on a Debian/Ubuntu machine: Jupyter's nbconvert and client from Debian's packages.
# The Java kernel itself is built by Maven; nothing here downloads Python packages. Quick when everything is present.
set -euo pipefail

# Debian's jupyter runs on /usr/bin/python3; check that interpreter (a python3 earlier on PATH may be another one).
py=/usr/bin/python3
need=()
command -v jupyter >/dev/null 2>&1 || need+=(jupyter-core)
"$py" -c 'import nbconvert, nbclient' >/dev/null 2>&1 || need+=(python3-nbconvert jupyter-nbconvert)
"$py" -c 'import jupyter_client' >/dev/null 2>&1 || need+=(python3-jupyter-client jupyter-client)

if [ ${#need[@]} -eq 0 ]; then
  echo "notebook dependencies already installed: $(jupyter nbconvert --version 2>/dev/null | head -1 | sed 's/^/nbconvert /')"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
echo "installing: ${need[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
jupyter nbconvert --version
