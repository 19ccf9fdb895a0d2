# Sampling throughput on a 2-core CPU: two 1-thread processes at once (the quality matrix's --workers 2
# --threads 1) against one 2-thread process, alternated, on a 32 px UNet the matrix trained.
#   bash run.sh <trained pipeline>/unet
here=$(dirname "$0")
for trial in 1 2; do
  echo "-- trial $trial: two processes, 1 thread each, at once"
  python "$here/unet_passes.py" "$1" 1 6 & python "$here/unet_passes.py" "$1" 1 6; wait
  echo "-- trial $trial: one process, 2 threads"
  python "$here/unet_passes.py" "$1" 2 8
done
