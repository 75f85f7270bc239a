from loyalist.service import run_service
from services.ingest.app import create_app, serve_fast

run_service("ingest", create_app, wrap=serve_fast)
