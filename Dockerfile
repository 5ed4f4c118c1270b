# One image with every Flotilla binary; compose.yaml picks the command per service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 flotilla
COPY --from=build /src/target/release/flotilla /src/target/release/flotilla-dispatcher \
     /src/target/release/flotilla-agent-runner /src/target/release/flotilla-monitor \
     /src/target/release/flotilla-budget-keeper /usr/local/bin/
COPY examples/demo-fleet.toml /etc/flotilla/fleet.toml
# The credentials volume of compose.yaml: written by `flotilla auth init` as this user.
RUN mkdir /auth && chown flotilla /auth
USER flotilla
