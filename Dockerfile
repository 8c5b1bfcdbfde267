# One image for every role: api (gunicorn), worker (celery; pool by WORKER_CONCURRENCY), migrate.
# The API role does not need torch; it is installed for the workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# gcc: torch.compile (TORCH_COMPILE=auto on GPU workers) builds its kernels with a C compiler at run time
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CUDA build of PyTorch for GPU workers; override TORCH_SPEC for a CPU-only image.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY bonedetect bonedetect
COPY api api
COPY db db
COPY model model
COPY worker worker
COPY training training
RUN pip install ".[server]"
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "4", "api:create_app()"]
