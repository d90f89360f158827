#!/usr/bin/env bash
# The mini world's results from one base, end to end: README's "Results" and docs/mini_results*.md.
#
#   bash mini/results.sh [BASE] [RUNS]    # defaults: the embedded base, runs/mini_results
#
# Pre-encodes the train split with BASE's VAE and text encoder, trains Stand-In and the paper's two ablations
# (vanilla attention, shared positions) on the frozen BASE, then writes the three tables (text guidance: the base's
# default, 5, 1) to RUNS/mini_results{,_guidance5,_guidance1}.{md,json,png}. On 2 CPU cores: 15 min, 3 x 27 min,
# about 35 min. Each stage continues what a killed run left (prepare completes its folder, training resumes from its
# last checkpoint, a finished table is kept): rerun the same command after a stop.
# CLIPS, STEPS, COUNT and REFERENCE_CLIPS (environment) shrink it for a quick check of the wiring. To refresh the
# shipped results, copy the tables to docs/ and RUNS/VARIANT/report.json to docs/mini_training/adapter_VARIANT.json.
set -euo pipefail

BASE=${1:-$(python -c "from standin_mini.settings import MINI_WEIGHTS; print(MINI_WEIGHTS)")}
RUNS=${2:-runs/mini_results}
CLIPS=${CLIPS:-3000}
STEPS=${STEPS:-4000}
COUNT=${COUNT:-48}
REFERENCE_CLIPS=${REFERENCE_CLIPS:-48}
mkdir -p "$RUNS"

standin mini prepare --base "$BASE" --out "$RUNS/data" --clips "$CLIPS"

# The shipped adapter's recipe; the ablations change one thing each.
for variant in standin vanilla shared; do
    case $variant in
        standin) ablation=() ;;
        vanilla) ablation=(--attention vanilla) ;;
        shared) ablation=(--positions shared) ;;
    esac
    standin train --base "$BASE" --data "$RUNS/data" --val-data mini -o "$RUNS/$variant" --resume \
        --rank 32 --lr 5e-4 --steps "$STEPS" --batch-size 8 "${ablation[@]}"
done

adapters=(--adapter "standin=$RUNS/standin/adapter.safetensors"
          --adapter "vanilla=$RUNS/vanilla/adapter.safetensors"
          --adapter "shared=$RUNS/shared/adapter.safetensors")
table() {  # STEM, then evaluate's options; a table already written is kept
    local stem=$1; shift
    [[ -f "$stem.json" ]] || python -m standin_mini.evaluate --base "$BASE" "${adapters[@]}" --count "$COUNT" \
        --out "$stem" "$@"
}
table "$RUNS/mini_results" --reference-guidance 4 --reference-guidance 3 --reference-clips "$REFERENCE_CLIPS"
table "$RUNS/mini_results_guidance5" --guidance 5 --reference-guidance 3 --reference-clips "$REFERENCE_CLIPS"
table "$RUNS/mini_results_guidance1" --guidance 1 --reference-clips 0
echo "tables: $RUNS/mini_results{,_guidance5,_guidance1}.md"
