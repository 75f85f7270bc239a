from loyalist.service import run_service
from services.profile.app import create_app

if __name__ == "__main__":
    run_service("profile", create_app)
