from loyalist.service import run_service
from services.journeys.app import create_app

run_service("journeys", create_app)
