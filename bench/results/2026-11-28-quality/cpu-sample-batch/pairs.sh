# The comparison the quality matrix's two 1-thread workers depend on, alone: two 1-thread processes at once
# on the 32 px UNet, sampling batch 250 against 64, alternated, with the matrix paused:
#   bash pairs.sh <32 px trained pipeline>/unet <trials>
passes=../cpu-threads/unet_passes.py
cd "$(dirname "$0")"
for trial in $(seq "$2"); do
  for batch in 250 64; do
    echo "-- trial $trial, 32 px, two 1-thread processes at once"
    python $passes "$1" 1 $((1500 / batch)) $batch & python $passes "$1" 1 $((1500 / batch)) $batch; wait
  done
done
