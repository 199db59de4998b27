from quotameter.cli import app

app(prog_name="quotameter")
