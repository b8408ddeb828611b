# maskcon on CUDA 13 GPUs. The devel image carries nvcc and the CUDA headers and build-essential a C++
# compiler, so `--compile` (torch.compile, Triton) can build its kernels. The host needs an NVIDIA driver
# of version 580 or newer (CUDA 13) and the NVIDIA container toolkit.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /maskcon

# The dependencies first, read from pyproject.toml alone: editing the sources does not reinstall them.
COPY pyproject.toml ./
RUN python3 -m venv .venv \
    && .venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['test']))" > /tmp/requirements.txt \
    && .venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# Then the project itself, without touching the dependencies.
COPY . .
RUN .venv/bin/pip install --no-cache-dir --no-deps -e .

# shards/ and runs/ are meant to be volumes; TORCH_HOME keeps the downloaded ImageNet weights in a volume too.
ENV PATH=/maskcon/.venv/bin:$PATH \
    TORCH_HOME=/cache/torch \
    WANDB_DIR=/maskcon/runs
VOLUME ["/maskcon/shards", "/maskcon/runs", "/cache/torch"]

CMD ["python", "launch/train.py"]
