# sendguard container: non-root, config under /etc/sendguard, state under /var/lib/sendguard.
#   docker build -t sendguard .
#   docker run -p 2525:2525 -p 9025:9025 -v $PWD/my.yaml:/etc/sendguard/sendguard.yaml:ro sendguard
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ARG UID=10025
RUN useradd --system --uid "${UID}" --user-group --home-dir /var/lib/sendguard --create-home \
        --shell /usr/sbin/nologin sendguard \
    && mkdir -p /etc/sendguard
COPY --from=build /install /usr/local
COPY config/docker.yaml /etc/sendguard/sendguard.yaml
WORKDIR /var/lib/sendguard
USER sendguard
EXPOSE 2525 9025
VOLUME ["/var/lib/sendguard"]
# /readyz answers 200 once the listeners are up and the config is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9025/readyz', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sendguard"]
CMD ["serve", "--config", "/etc/sendguard/sendguard.yaml"]
