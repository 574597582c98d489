{{/* The operator's ServiceAccount, ClusterRole, ClusterRoleBinding, Deployment and Service name. */}}
{{- define "whetstone.operatorName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.operatorName | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object the chart renders (the CRDs keep their generated ones and get these too). */}}
{{- define "whetstone.labels" -}}
app.kubernetes.io/name: whetstone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: whetstone
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The operator pod's labels that its Deployment and Service select on (never change: selectors are immutable). */}}
{{- define "whetstone.operatorSelector" -}}
app.kubernetes.io/name: whetstone
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "whetstone.operatorLabels" -}}
{{ include "whetstone.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "whetstone.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* A toleration as the operator's --trainer-toleration flag: KEY[=VALUE][:EFFECT] (no =VALUE: Exists). */}}
{{- define "whetstone.tolerationFlag" -}}
{{- .key | default "" -}}
{{- if ne (.operator | default "Equal") "Exists" -}}={{ .value | default "" }}{{- end -}}
{{- with .effect -}}:{{ . }}{{- end -}}
{{- end -}}

{{/* The operator's command-line flags, from values (see `whetstone operator --help`). */}}
{{- define "whetstone.operatorArgs" -}}
{{- $op := .Values.operator -}}
{{- $tr := .Values.trainer -}}
- {{ printf "--port=%v" $op.port | quote }}
{{- if $op.bindPodIP }}
- "--host=$(POD_IP)"
{{- end }}
{{- range .Values.watchNamespaces }}
- {{ printf "--namespace=%s" . | quote }}
{{- end }}
{{- if $op.leaderElection }}
- "--leader-elect"
- {{ printf "--lease-name=%s" (include "whetstone.operatorName" .) | quote }}
{{- else }}
- "--no-leader-elect"
{{- end }}
- {{ printf "--resync-seconds=%v" $op.resyncSeconds | quote }}
- {{ printf "--progress-seconds=%v" $op.progressSeconds | quote }}
- {{ printf "--workers=%v" $op.workers | quote }}
- {{ printf "--trainer-image=%s" (include "whetstone.image" (list $tr.image .)) | quote }}
- {{ printf "--trainer-status-port=%v" $tr.statusPort | quote }}
- {{ printf "--master-port=%v" $tr.masterPort | quote }}
- {{ printf "--termination-grace-seconds=%v" $tr.terminationGracePeriodSeconds | quote }}
{{- if $tr.networkPolicy }}
- "--network-policy"
{{- range $key, $value := fromYaml (include "whetstone.operatorSelector" .) }}
- {{ printf "--operator-pod-label=%s=%s" $key $value | quote }}
{{- end }}
{{- range $tr.metricsFromNamespaces }}
- {{ printf "--status-port-from-namespace=%s" . | quote }}
{{- end }}
{{- else }}
- "--no-network-policy"
{{- end }}
{{- range $key, $value := $tr.nodeSelector }}
- {{ printf "--trainer-node-selector=%s=%s" $key $value | quote }}
{{- end }}
{{- range $tr.tolerations }}
- {{ printf "--trainer-toleration=%s" (include "whetstone.tolerationFlag" .) | quote }}
{{- end }}
{{- range $op.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}
