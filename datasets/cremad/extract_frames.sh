#!/usr/bin/env bash
# Extract CREMA-D video frames at FPS frames per second (default 1) into the layout that the `cremad`
# dataset (and OGM-GE / C2KD) reads:  DEST/Image-01-FPS/<clip>/00001.jpg, 00002.jpg, ...
#
#   datasets/cremad/extract_frames.sh SRC_VIDEO_DIR DEST_DIR [FPS] [JOBS]
#
#   SRC_VIDEO_DIR  CREMA-D's VideoFlash/ folder (<clip>.flv; .mp4 files are taken too)
#   DEST_DIR       the dataset folder, e.g. data/cremad (frames go to DEST_DIR/Image-<FPS, 2 digits>-FPS/)
#   JOBS           parallel ffmpeg processes (default: number of CPUs)
#
# Needs ffmpeg. Clips whose frame folder already holds jpgs are skipped, so an interrupted run can be
# restarted; each clip is written to a temporary folder and renamed when complete.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
src=$1
dest=$2
fps=${3:-1}
jobs=${4:-$(nproc)}
command -v ffmpeg >/dev/null || { echo "extract_frames.sh: ffmpeg not found (apt-get install ffmpeg)" >&2; exit 1; }
[[ -d $src ]] || { echo "extract_frames.sh: $src: no such directory" >&2; exit 1; }
out=$dest/$(printf 'Image-%02d-FPS' "$fps")
mkdir -p "$out"

extract_one() {  # $1 = video file, $2 = output root, $3 = fps
  local video=$1 root=$2 rate=$3 clip
  clip=$(basename "${video%.*}")
  if compgen -G "$root/$clip/*.jpg" >/dev/null; then
    return 0
  fi
  local tmp=$root/.$clip.tmp$$
  rm -rf "$tmp" && mkdir -p "$tmp"
  if ffmpeg -nostdin -loglevel error -i "$video" -vf "fps=$rate" -q:v 2 "$tmp/%05d.jpg" \
      && compgen -G "$tmp/*.jpg" >/dev/null; then
    rm -rf "${root:?}/$clip" && mv "$tmp" "$root/$clip"
  else
    rm -rf "$tmp"
    echo "extract_frames.sh: $video: ffmpeg produced no frames" >&2
    return 1
  fi
}
export -f extract_one

find "$src" -maxdepth 1 -type f \( -iname '*.flv' -o -iname '*.mp4' \) -print0 \
  | xargs -0 -P "$jobs" -I{} bash -c 'extract_one "$1" "$2" "$3"' _ {} "$out" "$fps"
echo "frames in $out: $(find "$out" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | wc -l) clips"
