#!/usr/bin/env python3
"""A Kubernetes API emulator for process-level tests of `dopd operator`, on loopback.

Storage, listing and watch streams come from kmock's KubernetesEmulator (PyPI `kmock`), run
in-process on a private port. In front of it sits this adapter, which adds what an operator and
kubectl rely on and kmock leaves out:

- metadata: uid, resourceVersion, generation, creationTimestamp;
- server-side apply that creates, PUT with resourceVersion conflicts (409), JSON patches,
  the status subresource (status writes only touch status, spec writes never touch it);
- label selectors on list and watch;
- discovery (/api, /apis, resource lists) for built-in kinds and for CRDs once applied;
- CRD schemas: defaulting, OpenAPI validation and CEL rules (x-kubernetes-validations, via
  cel-python), answered as 422 Invalid with the field path and message, like the API server;
- Table output with the CRD's printer columns, so `kubectl get` shows them;
- a stand-in for the controller manager: Deployments get pods (ready at once, or Pending when
  the pod template asks for more `nvidia.com/gpu` than --gpus-free allows), surplus pods go
  lowest `controller.kubernetes.io/pod-deletion-cost` first, Deployment status follows, and
  children whose owner is gone are garbage-collected.

Usage: kube_emulator.py --port 0 --port-file FILE [--gpus-free N]
"""

import argparse
import asyncio
import copy
import datetime
import json
import random
import string
import sys
import urllib.parse
import uuid

import aiohttp
import aiohttp.web as web
import celpy
import jsonpatch
import jsonschema
import kmock
import yaml

BUILTIN = {
    # group/version: [(plural, kind, namespaced, short names)]
    "v1": [
        ("pods", "Pod", True, ["po"]),
        ("services", "Service", True, ["svc"]),
        ("configmaps", "ConfigMap", True, ["cm"]),
        ("secrets", "Secret", True, []),
        ("serviceaccounts", "ServiceAccount", True, ["sa"]),
        ("events", "Event", True, ["ev"]),
        ("namespaces", "Namespace", False, ["ns"]),
    ],
    "apps/v1": [("deployments", "Deployment", True, ["deploy"]), ("replicasets", "ReplicaSet", True, ["rs"])],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True, ["pdb"])],
    "rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True, []),
        ("rolebindings", "RoleBinding", True, []),
        ("clusterroles", "ClusterRole", False, []),
        ("clusterrolebindings", "ClusterRoleBinding", False, []),
    ],
    "coordination.k8s.io/v1": [("leases", "Lease", True, [])],
    "events.k8s.io/v1": [("events", "Event", True, ["ev"])],
    "discovery.k8s.io/v1": [("endpointslices", "EndpointSlice", True, [])],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False, ["crd", "crds"])],
    "scheduling.k8s.io/v1": [("priorityclasses", "PriorityClass", False, ["pc"])],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def now_rfc3339():
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code, reason, message, details=None):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def parse_path(path):
    """(group_version, namespace, plural, name, subresource) or None for non-resource paths."""
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return None
    if parts[0] == "api":
        if len(parts) < 2:
            return None
        gv, rest = parts[1], parts[2:]
    else:
        if len(parts) < 3:
            return None
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    ns = None
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    if not rest:
        return (gv, ns, None, None, None)
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if plural == "namespaces" and name and sub is None and ns is None:
        return (gv, None, plural, name, None)
    return (gv, ns, plural, name, sub)


def label_match(labels, selector):
    labels = labels or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def diff_patch(old, new):
    """A kmock patch (recursive merge, None deletes) turning `old` into `new`."""
    out = {}
    for k in old:
        if k not in new:
            out[k] = None
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            sub = diff_patch(old[k], v)
            if sub:
                out[k] = sub
        elif old.get(k) != v:
            out[k] = v
    return out


def merge(base, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def age(ts):
    try:
        t = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except (TypeError, ValueError):
        return "<unknown>"
    s = int((datetime.datetime.now(datetime.UTC) - t).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def jsonpath(obj, path):
    cur = obj
    for part in path.strip(".").split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


# ---------------------------------------------------------------- schema: defaults, validation, CEL

def to_jsonschema(s):
    """OpenAPI v3 (structural) to JSON Schema: `nullable` becomes a null type."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {p: to_jsonschema(x) for p, x in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [to_jsonschema(x) for x in v]
        elif k.startswith("x-kubernetes") or k in ("nullable", "format", "default"):
            continue
        else:
            out[k] = v
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if s.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    return out


def apply_defaults(schema, obj):
    if not isinstance(schema, dict) or not isinstance(obj, dict):
        return obj
    for name, sub in (schema.get("properties") or {}).items():
        if name not in obj and "default" in sub:
            obj[name] = copy.deepcopy(sub["default"])
        if name in obj:
            if isinstance(obj[name], dict):
                apply_defaults(sub, obj[name])
            elif isinstance(obj[name], list) and isinstance(sub.get("items"), dict):
                for item in obj[name]:
                    apply_defaults(sub["items"], item)
    return obj


CEL_ENV = celpy.Environment()


def cel_errors(schema, value, path):
    errs = []
    if not isinstance(schema, dict) or value is None:
        return errs
    for rule in schema.get("x-kubernetes-validations") or []:
        try:
            prog = CEL_ENV.program(CEL_ENV.compile(rule["rule"]))
            ok = prog.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # a rule that cannot run is a failure, as in the API server
            errs.append((path, f"rule {rule['rule']!r} failed to evaluate: {e}", value))
            continue
        if not bool(ok):
            errs.append((path, rule.get("message") or f"failed rule: {rule['rule']}", value))
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                errs += cel_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errs += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errs


def show(v):
    return '"object"' if isinstance(v, dict) else json.dumps(v)


def validate(crd_version_schema, obj):
    """List of (field, message, value) problems, as the API server reports them."""
    schema = crd_version_schema
    problems = []
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    sub_schema = {"type": "object", "properties": {k: v for k, v in (schema.get("properties") or {}).items()
                                                    if k not in ("apiVersion", "kind", "metadata", "status")},
                  "required": [r for r in schema.get("required", []) if r != "status"]}
    validator = jsonschema.Draft202012Validator(to_jsonschema(sub_schema))
    for e in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        field = ".".join(str(p) for p in e.absolute_path)
        if e.validator == "minimum":
            msg = f"{field} in body should be greater than or equal to {e.validator_value}"
        elif e.validator == "maximum":
            msg = f"{field} in body should be less than or equal to {e.validator_value}"
        elif e.validator == "required":
            missing = e.message.split("'")[1] if "'" in e.message else e.message
            field = f"{field}.{missing}" if field else missing
            msg = "Required value"
        else:
            msg = e.message
        problems.append((field, msg, e.instance))
    if not problems:
        for name, sub in sub_schema["properties"].items():
            if name in body:
                for path, msg, v in cel_errors(sub, body[name], name):
                    problems.append((path, msg, v))
    return problems


# ---------------------------------------------------------------- the adapter

class Adapter:
    def __init__(self, backend, gpus_free):
        self.backend = backend.rstrip("/")
        self.session = None
        self.rv = 1000
        self.crds = {}  # (group, plural) -> crd
        self.gpus_free = gpus_free
        self.ip = 10

    # -- plumbing to kmock

    async def up(self, method, path, body=None, params=None):
        async with self.session.request(method, self.backend + path, json=body, params=params) as r:
            text = await r.text()
            try:
                data = json.loads(text) if text else None
            except json.JSONDecodeError:
                data = None
            return r.status, data

    def next_rv(self):
        self.rv += 1
        return str(self.rv)

    def kind_of(self, gv, plural):
        for p, kind, namespaced, _ in BUILTIN.get(gv, []):
            if p == plural:
                return kind, namespaced
        group = gv.split("/")[0] if "/" in gv else ""
        crd = self.crds.get((group, plural))
        if crd:
            return crd["spec"]["names"]["kind"], crd["spec"]["scope"] == "Namespaced"
        return None, True

    def crd_version(self, gv, plural):
        if "/" not in gv:
            return None, None
        group, version = gv.split("/", 1)
        crd = self.crds.get((group, plural))
        if not crd:
            return None, None
        for v in crd["spec"]["versions"]:
            if v["name"] == version:
                return crd, v
        return crd, None

    def obj_path(self, gv, ns, plural, name):
        prefix = "/api/v1" if gv == "v1" else f"/apis/{gv}"
        nsp = f"/namespaces/{ns}" if ns else ""
        return f"{prefix}{nsp}/{plural}" + (f"/{name}" if name else "")

    async def get_obj(self, gv, ns, plural, name):
        code, data = await self.up("GET", self.obj_path(gv, ns, plural, name))
        return data if code == 200 else None

    # -- writes: every change goes to kmock as a create or a diff patch, so watches see it

    async def store(self, gv, ns, plural, name, old, new):
        new.setdefault("metadata", {})
        new["metadata"]["resourceVersion"] = self.next_rv()
        if old is None:
            code, data = await self.up("POST", self.obj_path(gv, ns, plural, None), new)
        else:
            code, data = await self.up("PATCH", self.obj_path(gv, ns, plural, name), diff_patch(old, new))
        if plural == "customresourcedefinitions":
            spec = new.get("spec", {})
            self.crds[(spec.get("group"), spec.get("names", {}).get("plural"))] = new
        return data if data is not None else new

    def prepare_create(self, gv, ns, plural, obj):
        kind, _ = self.kind_of(gv, plural)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if ns:
            meta["namespace"] = ns
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        obj.setdefault("apiVersion", gv)
        if kind:
            obj.setdefault("kind", kind)
        return obj

    def check(self, gv, plural, obj, old):
        """Defaults and validation for custom resources; a 422 response or None."""
        crd, version = self.crd_version(gv, plural)
        if not version:
            return None
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        apply_defaults(schema, obj)
        problems = validate(schema, obj)
        if not problems:
            return None
        kind = crd["spec"]["names"]["kind"]
        name = obj.get("metadata", {}).get("name", "")
        causes = [{"reason": "FieldValueInvalid", "field": f,
                   "message": f"Invalid value: {show(v)}: {m}"} for f, m, v in problems]
        text = ", ".join(f"{f}: Invalid value: {show(v)}: {m}" for f, m, v in problems)
        group = crd["spec"]["group"]
        return status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {text}',
                      {"name": name, "group": group, "kind": kind, "causes": causes})

    # -- the HTTP handler

    async def handle(self, request: web.Request):
        path = request.path
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0-dopd-emulator",
                                      "platform": "linux/amd64"})
        if path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                      "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}]})
        if path == "/apis":
            return web.json_response(self.group_list())
        if path.startswith("/openapi"):
            return status(404, "NotFound", "no OpenAPI document in the emulator (use --validate=false)")
        parsed = parse_path(path)
        if parsed is None:
            return status(404, "NotFound", f"{path} not found")
        gv, ns, plural, name, sub = parsed
        if plural is None:
            if path.startswith("/apis/") and len([p for p in path.split("/") if p]) == 2:
                return self.group(path.split("/")[2])
            return self.resource_list(gv)
        kind, namespaced = self.kind_of(gv, plural)
        if kind is None:
            return status(404, "NotFound", f"the server could not find the requested resource ({gv} {plural})")
        method = request.method
        body = None
        if method in ("POST", "PUT", "PATCH"):
            raw = await request.read()
            try:
                body = yaml.safe_load(raw.decode() or "null")
            except yaml.YAMLError as e:
                return status(400, "BadRequest", f"cannot parse the body: {e}")
        if method == "GET" and request.query.get("watch") in ("true", "1"):
            return await self.watch(request, gv, ns, plural)
        if method == "GET" and name is None:
            return await self.list(request, gv, ns, plural)
        if method == "GET":
            obj = await self.get_obj(gv, ns, plural, name)
            if obj is None:
                return status(404, "NotFound", f'{plural} "{name}" not found')
            if "as=Table" in request.headers.get("Accept", ""):
                return web.json_response(self.table(gv, plural, [obj]))
            return web.json_response(obj)
        if method == "POST" and name is None:
            if not isinstance(body, dict):
                return status(400, "BadRequest", "the body must be an object")
            name = (body.get("metadata") or {}).get("name") or ""
            if name and await self.get_obj(gv, ns, plural, name) is not None:
                return status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            obj = self.prepare_create(gv, ns, plural, body)
            bad = self.check(gv, plural, obj, None)
            if bad:
                return bad
            obj.pop("status", None) if self.crd_version(gv, plural)[1] else None
            return web.json_response(await self.store(gv, ns, plural, obj["metadata"]["name"], None, obj), status=201)
        if method in ("PUT", "PATCH") and name:
            return await self.update(request, gv, ns, plural, name, sub, body)
        if method == "DELETE" and name:
            return await self.delete(gv, ns, plural, name)
        return status(405, "MethodNotAllowed", f"{method} {path}")

    async def update(self, request, gv, ns, plural, name, sub, body):
        old = await self.get_obj(gv, ns, plural, name)
        ctype = request.headers.get("Content-Type", "")
        if old is None and not (request.method == "PATCH" and "apply-patch" in ctype):
            return status(404, "NotFound", f'{plural} "{name}" not found')
        base = copy.deepcopy(old) if old else {}
        if request.method == "PUT":
            if not isinstance(body, dict):
                return status(400, "BadRequest", "the body must be an object")
            want = (body.get("metadata") or {}).get("resourceVersion")
            if want and want != old["metadata"].get("resourceVersion"):
                return status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": '
                              "the object has been modified; please apply your changes to the latest version and try again")
            new = copy.deepcopy(body)
        elif "json-patch" in ctype:
            try:
                new = jsonpatch.apply_patch(base, body or [])
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                # A `test` against a missing path for null passes in the API server.
                ops = [op for op in (body or []) if not (op.get("op") == "test" and op.get("value") is None)]
                try:
                    new = jsonpatch.apply_patch(base, ops)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
                    return status(422, "Invalid", f"json patch: {e}")
        else:
            if not isinstance(body, dict):
                return status(400, "BadRequest", "the body must be an object")
            new = merge(base, body)
        is_crd_kind = self.crd_version(gv, plural)[1] is not None or plural in ("deployments", "pods")
        if sub == "status" and "apply-patch" in ctype and old:
            # Server-side apply by the status's one field manager: fields it no longer sends are
            # removed, so the applied status is the whole status.
            new = {**base, "status": (body or {}).get("status")}
        elif sub == "status":
            new = {**base, "status": new.get("status")} if old else new
        elif is_crd_kind and old is not None:
            # The status subresource: writes to the main resource leave status alone.
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if old is None:
            new = self.prepare_create(gv, ns, plural, new)
            new["metadata"]["name"] = name
        else:
            for k in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                if k in old.get("metadata", {}):
                    new.setdefault("metadata", {})[k] = old["metadata"][k]
            if sub != "status" and new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        bad = self.check(gv, plural, new, old) if sub != "status" else None
        if bad:
            return bad
        # An object being deleted whose last finalizer goes is removed by kmock itself.
        return web.json_response(await self.store(gv, ns, plural, name, old, new), status=201 if old is None else 200)

    async def delete(self, gv, ns, plural, name):
        old = await self.get_obj(gv, ns, plural, name)
        if old is None:
            return status(404, "NotFound", f'{plural} "{name}" not found')
        if old.get("metadata", {}).get("finalizers"):
            if not old["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                return web.json_response(await self.store(gv, ns, plural, name, old, new))
            return web.json_response(old)
        await self.up("DELETE", self.obj_path(gv, ns, plural, name))
        if plural == "customresourcedefinitions":
            spec = old.get("spec", {})
            self.crds.pop((spec.get("group"), spec.get("names", {}).get("plural")), None)
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success",
                                  "details": {"name": name, "kind": plural}})

    async def list_items(self, gv, ns, plural, selector=""):
        code, data = await self.up("GET", self.obj_path(gv, ns, plural, None))
        items = (data or {}).get("items", []) if code == 200 else []
        return [o for o in items if label_match(o.get("metadata", {}).get("labels"), selector)]

    async def list(self, request, gv, ns, plural):
        items = await self.list_items(gv, ns, plural, request.query.get("labelSelector", ""))
        if "as=Table" in request.headers.get("Accept", ""):
            return web.json_response(self.table(gv, plural, items))
        kind, _ = self.kind_of(gv, plural)
        return web.json_response({"apiVersion": gv, "kind": f"{kind}List",
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def watch(self, request, gv, ns, plural):
        selector = request.query.get("labelSelector", "")
        timeout = float(request.query.get("timeoutSeconds", "290"))
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        params = {"watch": "true"}
        try:
            async with self.session.get(self.backend + self.obj_path(gv, ns, plural, None), params=params,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as up:
                async def pump():
                    async for line in up.content:
                        line = line.strip()
                        if not line:
                            continue
                        try:
                            ev = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        obj = ev.get("object") or {}
                        if not label_match(obj.get("metadata", {}).get("labels"), selector):
                            continue
                        await resp.write(json.dumps(ev).encode() + b"\n")
                try:
                    await asyncio.wait_for(pump(), timeout)
                except asyncio.TimeoutError:
                    pass
        except (aiohttp.ClientError, ConnectionResetError):
            pass
        return resp

    # -- discovery and tables

    def all_resources(self):
        out = {gv: list(rs) for gv, rs in BUILTIN.items()}
        for (group, plural), crd in self.crds.items():
            names = crd["spec"]["names"]
            for v in crd["spec"]["versions"]:
                out.setdefault(f"{group}/{v['name']}", []).append(
                    (plural, names["kind"], crd["spec"]["scope"] == "Namespaced", names.get("shortNames", []),
                     names.get("categories", []), names.get("singular", "")))
        return out

    def group_list(self):
        groups = {}
        for gv in self.all_resources():
            if "/" in gv:
                g, v = gv.split("/", 1)
                groups.setdefault(g, []).append(v)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
            for g, vs in groups.items()]}

    def group(self, g):
        for grp in self.group_list()["groups"]:
            if grp["name"] == g:
                return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **grp})
        return status(404, "NotFound", f"group {g} not found")

    def resource_list(self, gv):
        rs = self.all_resources().get(gv)
        if rs is None:
            return status(404, "NotFound", f"{gv} not found")
        resources = []
        for r in rs:
            plural, kind, namespaced, short = r[0], r[1], r[2], r[3]
            cats = r[4] if len(r) > 4 else []
            singular = r[5] if len(r) > 5 else kind.lower()
            resources.append({"name": plural, "singularName": singular, "namespaced": namespaced, "kind": kind,
                              "verbs": VERBS, "shortNames": short, "categories": cats})
            if kind in ("Deployment", "Pod") or len(r) > 4:
                resources.append({"name": f"{plural}/status", "singularName": "", "namespaced": namespaced,
                                  "kind": kind, "verbs": ["get", "patch", "update"]})
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                  "resources": resources})

    def table(self, gv, plural, items):
        _, version = self.crd_version(gv, plural)
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        extra = (version or {}).get("additionalPrinterColumns") or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for c in extra:
            cols.append({"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                         "description": c.get("description", ""), "priority": c.get("priority", 0)})
        rows = []
        for o in items:
            cells = [o.get("metadata", {}).get("name", "")]
            for c in extra:
                v = jsonpath(o, c["jsonPath"])
                cells.append(age(v) if c["type"] == "date" else ("<none>" if v is None else v))
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": o.get("metadata", {})}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self.rv)},
                "columnDefinitions": cols, "rows": rows}

    # -- the controller-manager stand-in

    def pod_gpus(self, template):
        n = 0
        for c in (template.get("spec") or {}).get("containers") or []:
            lim = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
            if lim is not None:
                n += int(str(lim))
        return n

    async def controllers(self):
        n = 0
        while True:
            try:
                await self.reconcile_deployments()
                if n % 10 == 0:
                    await self.collect_garbage()
            except Exception as e:  # keep the loop alive; tests read the log
                print(f"emulator: controller loop: {e!r}", file=sys.stderr, flush=True)
            n += 1
            await asyncio.sleep(0.5)

    async def reconcile_deployments(self):
        deps = await self.list_items("apps/v1", None, "deployments")
        pods = await self.list_items("v1", None, "pods")
        used = sum(self.pod_gpus({"spec": p.get("spec", {})}) for p in pods
                   if (p.get("status") or {}).get("phase") == "Running")
        for d in deps:
            meta = d["metadata"]
            ns = meta.get("namespace")
            want = (d.get("spec") or {}).get("replicas", 1)
            sel = ((d.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            selector = ",".join(f"{k}={v}" for k, v in sel.items())
            mine = [p for p in pods if p["metadata"].get("namespace") == ns
                    and label_match(p["metadata"].get("labels"), selector)
                    and not p["metadata"].get("deletionTimestamp")]
            template = (d.get("spec") or {}).get("template") or {}
            for _ in range(max(0, want - len(mine))):
                gpus = self.pod_gpus(template)
                fits = self.gpus_free is None or used + gpus <= self.gpus_free
                if fits:
                    used += gpus
                self.ip += 1
                pod = {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": f"{meta['name']}-", "namespace": ns,
                                 "labels": (template.get("metadata") or {}).get("labels") or {},
                                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                      "name": meta["name"], "uid": meta.get("uid"),
                                                      "controller": True}]},
                    "spec": copy.deepcopy(template.get("spec") or {}),
                    "status": ({"phase": "Running", "podIP": f"127.0.0.{self.ip % 250 + 2}",
                                "conditions": [{"type": "Ready", "status": "True"}]} if fits else
                               {"phase": "Pending", "conditions": [
                                   {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}),
                }
                pod = self.prepare_create("v1", ns, "pods", pod)
                await self.store("v1", ns, "pods", pod["metadata"]["name"], None, pod)
                mine.append(pod)
            if len(mine) > want:
                def rank(p):
                    ready = (p.get("status") or {}).get("phase") == "Running"
                    cost = int(((p["metadata"].get("annotations") or {})
                                .get("controller.kubernetes.io/pod-deletion-cost", "0")))
                    return (ready, cost, p["metadata"].get("creationTimestamp", ""))
                for p in sorted(mine, key=rank)[:len(mine) - want]:
                    await self.up("DELETE", self.obj_path("v1", ns, "pods", p["metadata"]["name"]))
                    mine.remove(p)
            ready = sum(1 for p in mine if (p.get("status") or {}).get("phase") == "Running")
            st = {"replicas": len(mine), "readyReplicas": ready, "availableReplicas": ready,
                  "updatedReplicas": len(mine), "observedGeneration": meta.get("generation", 1)}
            if d.get("status") != st:
                new = copy.deepcopy(d)
                new["status"] = st
                await self.store("apps/v1", ns, "deployments", meta["name"], d, new)

    async def collect_garbage(self):
        uids = set()
        everything = []
        for gv, rs in self.all_resources().items():
            for r in rs:
                if r[0] in ("events", "customresourcedefinitions", "namespaces", "clusterroles",
                            "clusterrolebindings", "priorityclasses", "leases", "endpointslices"):
                    continue
                for o in await self.list_items(gv, None, r[0]):
                    uids.add(o["metadata"].get("uid"))
                    everything.append((gv, r[0], o))
        for gv, plural, o in everything:
            owners = o["metadata"].get("ownerReferences") or []
            if owners and not any(ref.get("uid") in uids for ref in owners):
                await self.up("DELETE", self.obj_path(gv, o["metadata"].get("namespace"), plural, o["metadata"]["name"]))


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the chosen port here once serving")
    ap.add_argument("--gpus-free", type=int, default=None,
                    help="GPUs the pretend cluster has; pods beyond it stay Pending")
    a = ap.parse_args()
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as backend:
        adapter = Adapter(str(backend.url), a.gpus_free)
        adapter.session = aiohttp.ClientSession()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", adapter.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", a.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"kube emulator: serving on http://127.0.0.1:{port} (kmock {kmock.__version__})", flush=True)
        if a.port_file:
            with open(a.port_file, "w") as f:
                f.write(str(port))
        task = asyncio.create_task(adapter.controllers())
        try:
            await asyncio.Event().wait()
        finally:
            task.cancel()
            await adapter.session.close()
            await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
