#!/bin/sh
# Build the optional region decoder used by fast_jpeg.py (needs gcc and libjpeg62-turbo-dev).
# Output: csrc/libjpeg_region.so (fast_jpeg.py decodes whole images when it is missing).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/libjpeg_region.so}"
gcc -O2 -Wall -Wextra -shared -fPIC -o "$out" "$here/jpeg_region.c" -ljpeg
echo "built $out"
