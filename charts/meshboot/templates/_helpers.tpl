{{/* Names: the control plane is "meshboot-webhook" unless overridden. */}}
{{- define "meshboot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshboot.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-webhook" (include "meshboot.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
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
