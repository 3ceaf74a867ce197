{{/* Names: the control plane is "meshboot-webhook" unless overridden. */}}
{{- define "meshboot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The control plane's name without its revision: a tag's Service keeps it, so the name outlives a move. */}}
{{- define "meshboot.baseName" -}}
{{- .Values.fullnameOverride | default (printf "%s-webhook" (include "meshboot.name" .)) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshboot.tagServiceName" -}}
{{- printf "%s-revision-tag-%s" (include "meshboot.baseName" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A revision's objects carry its name, as istiod-<revision> does: two releases never share a name. */}}
{{- define "meshboot.fullname" -}}
{{- $base := include "meshboot.baseName" . -}}
{{- if .Values.revision -}}
{{- $base = printf "%s-%s" $base .Values.revision -}}
{{- end -}}
{{- $base | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The istio.io/rev value of this control plane: its revision, "default" for the unrevisioned one (Istio's). */}}
{{- define "meshboot.revLabel" -}}
{{- .Values.revision | default "default" -}}
{{- end -}}

{{/* Istio's webhook configuration names: <name>[-<revision>], and a tag's istio-revision-tag-<tag> (with
-<namespace> outside istio-system, as Istio's chart names them). */}}
{{- define "meshboot.webhookConfigName" -}}
{{- if .Values.revision -}}
{{- printf "%s-%s" .Values.mutatingWebhook.name .Values.revision | trunc 253 -}}
{{- else -}}
{{- .Values.mutatingWebhook.name -}}
{{- end -}}
{{- end -}}

{{- define "meshboot.tagWebhookConfigName" -}}
{{- $ctx := index . 0 -}}
{{- if eq $ctx.Release.Namespace "istio-system" -}}
{{- printf "istio-revision-tag-%s" (index . 1) -}}
{{- else -}}
{{- printf "istio-revision-tag-%s-%s" (index . 1) $ctx.Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Every webhook configuration this release owns (the server keeps their caBundle), comma-joined. */}}
{{- define "meshboot.webhookConfigNames" -}}
{{- $names := list (include "meshboot.webhookConfigName" .) -}}
{{- range .Values.revisionTags }}{{ $names = append $names (include "meshboot.tagWebhookConfigName" (list $ . )) }}{{ end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "meshboot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "meshboot.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "meshboot.injectorConfigMap" -}}
{{- printf "%s-injector" (include "meshboot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshboot.meshConfigMap" -}}
{{- printf "%s-mesh" (include "meshboot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshboot.tlsSecret" -}}
{{- if and (eq .Values.certificates.mode "provided") .Values.certificates.provided.secretName -}}
{{- .Values.certificates.provided.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "meshboot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Standard labels on every object. */}}
{{- define "meshboot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshboot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshboot
istio.io/rev: {{ include "meshboot.revLabel" . | quote }}
{{- end -}}

{{- define "meshboot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshboot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/* Istio's image rule: used verbatim when it contains "/", else <hub>/<image>:<tag>. */}}
{{- define "meshboot.image" -}}
{{- $image := index . 0 -}}
{{- $g := index . 1 -}}
{{- if contains "/" $image -}}
{{- $image -}}
{{- else -}}
{{- printf "%s/%s:%v" $g.hub $image $g.tag -}}
{{- end -}}
{{- end -}}

{{/* Service DNS name without the cluster domain: what agents dial and verify. */}}
{{- define "meshboot.serviceHost" -}}
{{- printf "%s.%s.svc" (include "meshboot.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "meshboot.caEnabled" -}}
{{- if and .Values.ca.enabled (not .Values.istiod.address) -}}true{{- end -}}
{{- end -}}

{{/* The serving-certificate mode in effect: mesh-ca needs meshboot's CA, and falls back to self-managed without it. */}}
{{- define "meshboot.certMode" -}}
{{- if and (eq .Values.certificates.mode "mesh-ca") (not (include "meshboot.caEnabled" .)) -}}
self-managed
{{- else -}}
{{- .Values.certificates.mode -}}
{{- end -}}
{{- end -}}

{{/* A per-replica self-signed CA can be trusted for one replica only: 1 replica, Recreate. */}}
{{- define "meshboot.singleReplica" -}}
{{- if eq (include "meshboot.certMode" .) "self-managed" -}}true{{- end -}}
{{- end -}}

{{/* The server patches the webhook configuration's caBundle itself (with its own CA, or the mesh root). */}}
{{- define "meshboot.patchesCABundle" -}}
{{- if has (include "meshboot.certMode" .) (list "self-managed" "mesh-ca") -}}true{{- end -}}
{{- end -}}

{{/* CA_ADDR the injector writes into sidecars. */}}
{{- define "meshboot.caAddress" -}}
{{- if .Values.istiod.address -}}
{{- .Values.istiod.address -}}
{{- else if .Values.global.caAddress -}}
{{- .Values.global.caAddress -}}
{{- else -}}
{{- printf "%s:%v" (include "meshboot.serviceHost" .) .Values.ca.port -}}
{{- end -}}
{{- end -}}

{{/* Serving-certificate DNS names of the CA: the service's names, istiod's (as agents verify it) and CA_ADDR's host. */}}
{{- define "meshboot.caDNSNames" -}}
{{- $host := include "meshboot.serviceHost" . -}}
{{- $names := list $host (printf "%s.%s" $host .Values.global.proxy.clusterDomain) (printf "istiod.%s.svc" .Release.Namespace) "istiod.istio-system.svc" -}}
{{- $caHost := regexReplaceAll ":[0-9]+$" (include "meshboot.caAddress" .) "" -}}
{{- $names = append $names $caHost -}}
{{- range .Values.revisionTags }}{{ $names = append $names (printf "%s.%s.svc" (include "meshboot.tagServiceName" (list $ .)) $.Release.Namespace) }}{{ end -}}
{{- range .Values.ca.extraDNSNames }}{{ $names = append $names . }}{{ end -}}
{{- $names | uniq | join "," -}}
{{- end -}}

{{/* MAJOR.MINOR of the cluster, for native-sidecar auto detection. */}}
{{- define "meshboot.kubernetesVersion" -}}
{{- if .Values.webhook.kubernetesVersion -}}
{{- .Values.webhook.kubernetesVersion -}}
{{- else -}}
{{- printf "%s.%s" .Capabilities.KubeVersion.Major (.Capabilities.KubeVersion.Minor | trimSuffix "+") -}}
{{- end -}}
{{- end -}}

{{/* One clear error for combinations the schema cannot express. */}}
{{- define "meshboot.validate" -}}
{{- $mode := .Values.certificates.mode -}}
{{- include "meshboot.validateRevisions" . -}}
{{- if and (include "meshboot.singleReplica" .) .Values.autoscaling.enabled -}}
{{- fail (printf "autoscaling.enabled needs a serving certificate all replicas share, but certificates.mode is %s%s (a CA of each replica's own, one replica only): use certificates.mode=mesh-ca with meshboot's CA, cert-manager or provided" $mode (ternary " (mesh-ca falls back to self-managed: istiod.address is set or ca.enabled is false)" "" (eq $mode "mesh-ca"))) -}}
{{- end -}}
{{- $w := .Values.webhook -}}
{{- if and (not (include "meshboot.singleReplica" .)) (eq (atoi (trimSuffix "%" (toString $w.maxSurge))) 0) (eq (atoi (trimSuffix "%" (toString $w.maxUnavailable))) 0) -}}
{{- fail "webhook.maxSurge and webhook.maxUnavailable are both 0: a rolling update could never replace a replica (Kubernetes refuses the Deployment); keep maxSurge 1, maxUnavailable 0" -}}
{{- end -}}
{{- $detect := add (mul $w.readinessProbe.periodSeconds $w.readinessProbe.failureThreshold) 2 -}}
{{- if lt (int $w.drainDurationSeconds) (int $detect) -}}
{{- fail (printf "webhook.drainDurationSeconds=%v is too short: the endpoints controller needs up to webhook.readinessProbe.periodSeconds x failureThreshold + 2 = %v s to take a stopping replica out of the Service" $w.drainDurationSeconds $detect) -}}
{{- end -}}
{{- $need := add $w.drainDurationSeconds .Values.mutatingWebhook.timeoutSeconds -}}
{{- if lt (int $w.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "webhook.terminationGracePeriodSeconds=%v must be at least webhook.drainDurationSeconds + mutatingWebhook.timeoutSeconds = %v (the drain, then the last admissions in flight)" $w.terminationGracePeriodSeconds $need) -}}
{{- end -}}
{{- if eq $mode "provided" -}}
{{- if not .Values.certificates.provided.caBundle -}}
{{- fail "certificates.mode=provided needs certificates.provided.caBundle (PEM of the CA that signed the serving certificate)" -}}
{{- end -}}
{{- if and (not .Values.certificates.provided.secretName) (not (and .Values.certificates.provided.tlsCrt .Values.certificates.provided.tlsKey)) -}}
{{- fail "certificates.mode=provided needs certificates.provided.secretName, or both certificates.provided.tlsCrt and certificates.provided.tlsKey" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) -}}
{{- fail "podDisruptionBudget: set only one of minAvailable and maxUnavailable (set the other to null)" -}}
{{- end -}}
{{- end -}}

{{/* Fields shared by every webhook entry (Istio's mutatingwebhook.yaml). */}}
{{- define "meshboot.webhookCommon" -}}
clientConfig:
  service:
    name: {{ include "meshboot.fullname" . }}
    namespace: {{ .Release.Namespace }}
    path: /inject
    port: 443
  {{- if eq .Values.certificates.mode "provided" }}
  caBundle: {{ .Values.certificates.provided.caBundle | b64enc }}
  {{- end }}
rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
sideEffects: None
failurePolicy: {{ .Values.mutatingWebhook.failurePolicy }}
reinvocationPolicy: {{ .Values.mutatingWebhook.reinvocationPolicy }}
timeoutSeconds: {{ .Values.mutatingWebhook.timeoutSeconds }}
admissionReviewVersions: ["v1"]
{{- end -}}

{{/* Revisions and tags: the mistakes istioctl refuses, and the one the chart alone could make. */}}
{{- define "meshboot.validateRevisions" -}}
{{- if eq (toString .Values.revision) "default" -}}
{{- fail "revision=default: the default revision is the one installed without a revision (leave revision empty); to make a revision the default, give it the tag default (revisionTags: [default])" -}}
{{- end -}}
{{- range .Values.revisionTags -}}
{{- if and $.Values.revision (eq . $.Values.revision) -}}
{{- fail (printf "revisionTags: tag %q is the name of this revision (a tag must not hide a revision, as istioctl tag set refuses)" .) -}}
{{- end -}}
{{- if and (eq . "default") (not $.Values.revision) -}}
{{- fail "revisionTags: tag default on the unrevisioned release, which already takes istio-injection=enabled and istio.io/rev=default: both would select the same pods; give the tag to a revisioned release" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* cert-manager's CA injector fills every webhook's caBundle from the serving Certificate. */}}
{{- define "meshboot.webhookAnnotations" -}}
{{- if eq .Values.certificates.mode "cert-manager" -}}
annotations:
  cert-manager.io/inject-ca-from: {{ .Release.Namespace }}/{{ include "meshboot.fullname" . }}
{{- end -}}
{{- end -}}

{{/* The webhook entries of Istio's chart for one istio.io/rev value (a revision or a tag): (list ctx value
withDefault). withDefault adds the default revision's namespace./object. (and auto.) entries. */}}
{{- define "meshboot.webhooks" -}}
{{- $ctx := index . 0 -}}
{{- $rev := index . 1 -}}
- name: rev.namespace.sidecar-injector.istio.io
  {{- include "meshboot.webhookCommon" $ctx | nindent 2 }}
  namespaceSelector:
    matchExpressions:
      - key: istio.io/rev
        operator: In
        values: [{{ $rev | quote }}]
      - key: istio-injection
        operator: DoesNotExist
  objectSelector:
    matchExpressions:
      - key: sidecar.istio.io/inject
        operator: NotIn
        values: ["false"]
- name: rev.object.sidecar-injector.istio.io
  {{- include "meshboot.webhookCommon" $ctx | nindent 2 }}
  namespaceSelector:
    matchExpressions:
      - key: istio.io/rev
        operator: DoesNotExist
      - key: istio-injection
        operator: DoesNotExist
  objectSelector:
    matchExpressions:
      - key: sidecar.istio.io/inject
        operator: NotIn
        values: ["false"]
      - key: istio.io/rev
        operator: In
        values: [{{ $rev | quote }}]
{{- if index . 2 }}
- name: namespace.sidecar-injector.istio.io
  {{- include "meshboot.webhookCommon" $ctx | nindent 2 }}
  namespaceSelector:
    matchExpressions:
      - key: istio-injection
        operator: In
        values: ["enabled"]
  objectSelector:
    matchExpressions:
      - key: sidecar.istio.io/inject
        operator: NotIn
        values: ["false"]
- name: object.sidecar-injector.istio.io
  {{- include "meshboot.webhookCommon" $ctx | nindent 2 }}
  namespaceSelector:
    matchExpressions:
      - key: istio-injection
        operator: DoesNotExist
      - key: istio.io/rev
        operator: DoesNotExist
  objectSelector:
    matchExpressions:
      - key: sidecar.istio.io/inject
        operator: In
        values: ["true"]
      - key: istio.io/rev
        operator: DoesNotExist
{{- if $ctx.Values.sidecarInjectorWebhook.enableNamespacesByDefault }}
- name: auto.sidecar-injector.istio.io
  {{- include "meshboot.webhookCommon" $ctx | nindent 2 }}
  namespaceSelector:
    matchExpressions:
      - key: istio-injection
        operator: DoesNotExist
      - key: istio.io/rev
        operator: DoesNotExist
      - key: kubernetes.io/metadata.name
        operator: NotIn
        values: ["kube-system", "kube-public", "kube-node-lease", "local-path-storage", {{ $ctx.Release.Namespace | quote }}]
  objectSelector:
    matchExpressions:
      - key: sidecar.istio.io/inject
        operator: DoesNotExist
      - key: istio.io/rev
        operator: DoesNotExist
{{- end }}
{{- end }}
{{- end -}}

{{/* The control plane's Service ports (its Service and its tags'). */}}
{{- define "meshboot.servicePorts" -}}
# The API server calls the injector here (the webhook configuration's clientConfig.service).
- name: https-webhook
  port: 443
  targetPort: https-webhook
  protocol: TCP
{{- if include "meshboot.caEnabled" . }}
# Sidecars' CA_ADDR: Istio's CA protocol over TLS, like istiod:15012.
- name: tls-ca
  port: {{ .Values.ca.port }}
  targetPort: tls-ca
  protocol: TCP
{{- end }}
- name: http-monitoring
  port: {{ .Values.webhook.monitoringPort }}
  targetPort: http-monitoring
  protocol: TCP
{{- end -}}
