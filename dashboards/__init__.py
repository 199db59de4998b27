"""Dashboard panel definitions (rendered to Grafana JSON and a built-in page).

Empty for now: the panels arrive with the dashboards work.
"""
