# Sourced by the benchmarks/*_gpu.sh scripts: the environment of one device call.
# Wheels carried in .whl/ (diffusers and what it needs; the GPU image has none) go to /tmp/site;
# the checkout is importable without installing; NVLink multicast stays off (shared hosts).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
