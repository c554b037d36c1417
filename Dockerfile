# sendguard container: non-root, config under /etc/sendguard, state under /var/lib/sendguard.
#   docker build -t sendguard .
#   docker run -p 2525:2525 -p 127.0.0.1:9025:9025 -v $PWD/tls:/etc/sendguard/tls:ro sendguard
# The shipped config (config/docker.yaml) wants a certificate and key in /etc/sendguard/tls/
# (clients AUTH over STARTTLS; no network range relays without AUTH). Mount your own config
# over /etc/sendguard/sendguard.yaml; deploy/compose.yaml runs it with its stores.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
# fast: uvloop (event_loop: auto); milter: pymilter for `sendguard milter`, built against
# Sendmail's libmilter here, which the runtime stage carries as its shared library only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libmilter-dev \
    && pip install --no-cache-dir --prefix=/install ".[fast,milter]"

FROM python:3.11-slim
ARG UID=10025
RUN apt-get update && apt-get install -y --no-install-recommends libmilter1.0.1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid "${UID}" --user-group --home-dir /var/lib/sendguard --create-home \
        --shell /usr/sbin/nologin sendguard \
    && mkdir -p /etc/sendguard
COPY --from=build /install /usr/local
COPY config/docker.yaml /etc/sendguard/sendguard.yaml
WORKDIR /var/lib/sendguard
USER sendguard
EXPOSE 2525 9025
VOLUME ["/var/lib/sendguard"]
# `sendguard health` asks /readyz at the http.address of the config (wherever it listens):
# 200 once the listeners are up, the upstream answers and the consent store does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["sendguard", "health", "--config", "/etc/sendguard/sendguard.yaml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sendguard"]
CMD ["serve", "--config", "/etc/sendguard/sendguard.yaml"]
