{{/* Chart name, truncated to 63 characters (a DNS-1123 label). */}}
{{- define "flyte-actor-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, or release-chart when the release name does not contain the chart name. It names the
Deployment, the Service (so it is the host part of the lease address), the ServiceAccount and the RBAC objects.
*/}}
{{- define "flyte-actor-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flyte-actor-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. The agent pod deliberately carries no flyte-actors.io/replica label: the launcher lists and
watches pods with flyte-actors.io/replica=true as its replicas.
*/}}
{{- define "flyte-actor-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flyte-actor-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "flyte-actor-agent.labels" -}}
helm.sh/chart: {{ include "flyte-actor-agent.chart" . }}
{{ include "flyte-actor-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flyte-actors
{{- end }}

{{- define "flyte-actor-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flyte-actor-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flyte-actor-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Service's in-cluster DNS name: <fullname>.<namespace>.svc.<clusterDomain>. */}}
{{- define "flyte-actor-agent.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "flyte-actor-agent.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
The address replica pods dial for leases (FLYTE_ACTOR_LEASE_ADDRESS). Empty with the local launcher and no
override: the agent then advertises its own address, which processes in its pod can reach.
*/}}
{{- define "flyte-actor-agent.leaseAddress" -}}
{{- if .Values.leaseAddress }}
{{- .Values.leaseAddress }}
{{- else if eq .Values.launcher "kubernetes" }}
{{- printf "%s:%d" (include "flyte-actor-agent.serviceHost" .) (int .Values.ports.lease) }}
{{- end }}
{{- end }}

{{/* The Secret holding the key lease ids are signed with (created by templates/lease-key-secret.yaml unless given). */}}
{{- define "flyte-actor-agent.leaseKeySecret" -}}
{{- .Values.leaseSigningKey.existingSecret | default (printf "%s-lease-key" (include "flyte-actor-agent.fullname" .) | trunc 63 | trimSuffix "-") }}
{{- end }}

{{/* The endpoint for propeller's agent-service plugin (Flyte's k8s:// resolver: service.namespace:port). */}}
{{- define "flyte-actor-agent.propellerEndpoint" -}}
{{- printf "k8s://%s.%s:%d" (include "flyte-actor-agent.fullname" .) .Release.Namespace (int .Values.ports.grpc) }}
{{- end }}

{{/*
"grpc" or "tcp": the probe kind for this cluster (gRPC probes are on by default from Kubernetes 1.24). The kubelet's
gRPC probe speaks plaintext only, so a connector port with TLS gets a TCP probe.
*/}}
{{- define "flyte-actor-agent.probeType" -}}
{{- if and (eq .Values.probes.type "auto") .Values.tls.secretName }}tcp
{{- else if eq .Values.probes.type "auto" }}
{{- if semverCompare ">=1.24-0" .Capabilities.KubeVersion.Version }}grpc{{ else }}tcp{{ end }}
{{- else }}
{{- .Values.probes.type }}
{{- end }}
{{- end }}

{{/* The NetworkPolicy's selectors for propeller: the value when set, else flyte-core's propeller in namespace flyte. */}}
{{- define "flyte-actor-agent.propellerPodSelector" -}}
{{- .Values.networkPolicy.propeller.podSelector | default (dict "matchLabels" (dict "app.kubernetes.io/name" "flytepropeller")) | toYaml }}
{{- end }}

{{- define "flyte-actor-agent.propellerNamespaceSelector" -}}
{{- .Values.networkPolicy.propeller.namespaceSelector | default (dict "matchLabels" (dict "kubernetes.io/metadata.name" "flyte")) | toYaml }}
{{- end }}

{{/* Checks JSON Schema cannot express; `fail` stops the render with the message. */}}
{{- define "flyte-actor-agent.validate" -}}
{{- $ports := list (int .Values.ports.grpc) (int .Values.ports.lease) }}
{{- if .Values.metrics.enabled }}{{ $ports = append $ports (int .Values.ports.metrics) }}{{ end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "ports.grpc, ports.lease and ports.metrics must differ, got %v" $ports) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and (eq .Values.launcher "kubernetes") (not .Values.namespaces) (not .Values.rbac.clusterWide) }}
{{- fail "namespaces is empty: list the namespaces actor tasks run in (namespaces: [flytesnacks-development, ...]), or set rbac.clusterWide=true to let the agent create pods and Secrets in every namespace" }}
{{- end }}
{{- if and .Values.namespaces .Values.rbac.clusterWide }}
{{- fail "rbac.clusterWide=true with namespaces listed: choose one (listed namespaces get a Role each)" }}
{{- end }}
{{- end }}

{{/*
flytepropeller configuration that routes the actor task types to this agent, in three parts so that NOTES.txt
can show it both as propeller's own config and nested in flyte-core / flyte-binary Helm values.
*/}}
{{- define "flyte-actor-agent.propellerTasksConfig" -}}
tasks:
  task-plugins:
    enabled-plugins:
      - container
      - sidecar
      - k8s-array
      - agent-service
    default-for-task-types:
      container: container
      sidecar: sidecar
      container_array: k8s-array
      actor: agent-service
      actor-map: agent-service
{{- end }}

{{- define "flyte-actor-agent.propellerPluginsConfig" -}}
plugins:
  agent-service:
    defaultAgent:
      endpoint: {{ include "flyte-actor-agent.propellerEndpoint" . }}
      insecure: {{ not .Values.tls.secretName }}
    supportedTaskTypes:
      - actor
      - actor-map
    webApi:
      caching:
        resyncInterval: 5s
      readRateLimiter:
        qps: 100
        burst: 1000
{{- end }}

{{- define "flyte-actor-agent.propellerConfig" -}}
{{ include "flyte-actor-agent.propellerTasksConfig" . }}
{{ include "flyte-actor-agent.propellerPluginsConfig" . }}
{{- end }}
