# Backend, RQ worker and scheduler image (one image, three commands; see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/models DATA_DIR=/data/models/data
WORKDIR /app

# curl for the healthchecks; the image decoders PIL needs are in its wheels.
RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY model/ model/
COPY backend/ backend/
COPY label_config/ label_config/

RUN useradd --create-home --uid 1000 app && mkdir -p /data/models && chown -R app /data
USER app
EXPOSE 9090
# One gunicorn worker process holds the model once; its threads share it.
CMD ["gunicorn", "--workers", "1", "--threads", "4", "--timeout", "120", "--bind", "0.0.0.0:9090", \
     "backend.wsgi:app"]
