from loyalist.service import run_service
from services.notify.app import create_app

run_service("notify", create_app)
