# maskcon on CUDA 13 GPUs: installs the project exactly as README's quick start does.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /maskcon
COPY . .
RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir -e ".[test]"
ENV PATH=/maskcon/.venv/bin:$PATH \
    WANDB_DIR=/maskcon/runs

CMD ["accelerate", "launch", "launch/train.py"]
