"""Static checks of the deployment files (docker-compose, Dockerfile, Prometheus and Grafana config) that
CI runs where the files cannot be executed: ``python -m loyalist.checks.compose docker-compose.yml``."""
