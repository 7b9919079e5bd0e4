#!/usr/bin/env bash
# Set up, then run the whole pipeline on the bundled example (examples/support-intents) in a
# scratch copy, and print where the report is. Offline; ~10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
work=${STILLROOM_DEMO_DIR:-.demo/support-intents}
if [ ! -f "$work/stillroom.yaml" ]; then
  mkdir -p "$(dirname "$work")"
  cp -r examples/support-intents "$work"
fi
rc=0
stillroom run -C "$work" || rc=$?
echo
echo "Demo project: $work   (re-run this command: unchanged stages are skipped)"
echo "Report:       $work/.stillroom/report/report.html"
echo "Serve it:     stillroom serve -C $work   then point an OpenAI client at http://127.0.0.1:8000/v1"
exit $rc
