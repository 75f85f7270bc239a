from loyalist.service import run_service
from services.ingest.app import create_app

run_service("ingest", create_app)
