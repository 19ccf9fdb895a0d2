# One 2-thread process (the sample stage's on two cores, or the matrix's --workers 1) on the 32 px UNet,
# sampling batch 250 against 64, alternated, with the matrix paused:
#   bash one-process.sh <32 px trained pipeline>/unet <trials>
passes=../cpu-threads/unet_passes.py
cd "$(dirname "$0")"
for trial in $(seq "$2"); do
  for batch in 250 64; do
    echo "-- trial $trial, 32 px, one 2-thread process"
    python $passes "$1" 2 $((1500 / batch)) $batch
  done
done
