"""The Jinja2 environment shared by the HTML pages and the error page."""

from fastapi.templating import Jinja2Templates

from server.config import asset_dir

templates = Jinja2Templates(directory=str(asset_dir("templates")))
