#!/usr/bin/env bash
# Install the Debian/Ubuntu libraries MuJoCo needs for headless rendering (render_mode="rgb_array").
#
# Usage:  bash scripts/install_render.sh [egl|osmesa]     (default: $MUJOCO_GL, else egl)
#   egl     GPU or Mesa software EGL: libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0   (MUJOCO_GL=egl)
#   osmesa  pure-software OSMesa:      libosmesa6                                        (MUJOCO_GL=osmesa)
# Idempotent and quiet: does nothing when the libraries are already there; otherwise runs apt-get as
# root (or through sudo). Then render with e.g. `MUJOCO_GL=egl python scripts/render_episodes.py`.
set -euo pipefail
backend=${1:-${MUJOCO_GL:-egl}}

case "$backend" in
  egl)
    libs=(libEGL.so.1 libEGL_mesa.so.0 libOpenGL.so.0)
    pkgs=(libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0) ;;
  osmesa)
    libs=(libOSMesa.so)
    pkgs=(libosmesa6) ;;
  *)
    echo "install_render.sh: backend '$backend' is not supported: use egl or osmesa (glfw needs a display)" >&2
    exit 2 ;;
esac

missing=()
for lib in "${libs[@]}"; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || missing+=("$lib")
done
# EGL without a GPU falls back to Mesa's software driver (from libgl1-mesa-dri)
if [ "$backend" = egl ] && ! compgen -G "/usr/lib/*/dri/swrast_dri.so" >/dev/null && ! [ -e /usr/lib/dri/swrast_dri.so ]; then
  missing+=(swrast_dri.so)
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_render.sh: $backend rendering libraries already present"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_render.sh: missing ${missing[*]} and no apt-get here: install the equivalents of ${pkgs[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install_render.sh: missing ${missing[*]}: run as root (or install sudo) to apt-get install ${pkgs[*]}" >&2
    exit 1
  fi
fi
echo "install_render.sh: missing ${missing[*]}: installing ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_render.sh: apt-get failed (output above)" >&2
  exit 1
fi
echo "install_render.sh: done; use MUJOCO_GL=$backend"
