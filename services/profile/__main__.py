from loyalist.service import run_service
from services.profile.app import create_app
from services.profile.fastpath import serve_fast

if __name__ == "__main__":
    run_service("profile", create_app, wrap=serve_fast)
