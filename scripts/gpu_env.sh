# Sourced by the scripts that run on a GPU machine (gpu_check.sh, gpu_mnist_teachers.sh): the
# binary built here (scripts/gpu_prepare.sh), the output folder, libtorch's libraries, the GPU.
KD_RUN=${KD_RUN:-dist/kd-run}
OUT=${OUT:-runs-gpu}
TORCH_LIB=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
if [ -d "$TORCH_LIB" ]; then export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
# The CUDA runtime that kd-native's `cuda` feature links (CUDA graphs) sits beside torch/.
CUDART_LIB=${CUDART_LIB:-$TORCH_LIB/../../nvidia/cu13/lib}
if [ -d "$CUDART_LIB" ]; then export LD_LIBRARY_PATH="$CUDART_LIB:$LD_LIBRARY_PATH"; fi
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
