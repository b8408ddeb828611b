# maskcon on NVIDIA GPUs, one CUDA line per image: `docker build --build-arg CUDA=13 .` (the default; host
# driver 580 or newer) or `--build-arg CUDA=12` (driver 570 or newer), as README's Install table says. The
# devel images carry nvcc and the CUDA headers and build-essential a C++ compiler, so `--compile`
# (torch.compile, Triton) can build its kernels. The host needs the NVIDIA container toolkit.
ARG CUDA=13

FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04 AS cuda13
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS cuda12

FROM cuda${CUDA}
ARG CUDA

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /maskcon

# The dependencies first, read from pyproject.toml and pinned by the line's constraints file: editing the
# sources does not reinstall them.
COPY pyproject.toml constraints-cuda${CUDA}.txt ./
RUN python3 -m venv .venv \
    && .venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
print('\n'.join(p['dependencies'] + extras['cuda${CUDA}'] + extras['test']))" > /tmp/requirements.txt \
    && .venv/bin/pip install --no-cache-dir -c constraints-cuda${CUDA}.txt -r /tmp/requirements.txt

# Then the project itself, without touching the dependencies.
COPY . .
RUN .venv/bin/pip install --no-cache-dir --no-deps -e .

# shards/ and runs/ are meant to be volumes; TORCH_HOME keeps the downloaded ImageNet weights in a volume too.
ENV PATH=/maskcon/.venv/bin:$PATH \
    TORCH_HOME=/cache/torch \
    WANDB_DIR=/maskcon/runs
VOLUME ["/maskcon/shards", "/maskcon/runs", "/cache/torch"]

CMD ["python", "launch/train.py"]
