from loyalist.service import run_service
from services.segmenter.app import create_app

run_service("segmenter", create_app)
