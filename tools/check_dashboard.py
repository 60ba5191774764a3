"""Checks that template.yaml's dashboard body is valid JSON once !Sub fills it in.

CloudFormation only finds a broken DashboardBody at deploy time; this finds it in `make lint`.
"""
import json
import re
import sys

from cfnlint.decode import cfn_yaml

template = cfn_yaml.load(sys.argv[1] if len(sys.argv) > 1 else "template.yaml")
body, _ = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
filled = re.sub(r"\$\{[A-Za-z:]+\}", "x", body)
widgets = json.loads(filled)["widgets"]
assert widgets, "the dashboard has no widget"
print(f"dashboard body: valid JSON, {len(widgets)} widgets")
