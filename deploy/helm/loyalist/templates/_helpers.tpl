{{/* Names and labels shared by every template. */}}
{{- define "loyalist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loyalist.fullname" -}}
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

{{- define "loyalist.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loyalist.labels" -}}
app.kubernetes.io/name: {{ include "loyalist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "loyalist.metaLabels" . }}
{{- end }}

{{/* Labels that never select: added beside the selector labels on pods. */}}
{{- define "loyalist.metaLabels" -}}
helm.sh/chart: {{ include "loyalist.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loyalist
{{- end }}

{{/* Selector labels of one service: pass (dict "root" $ "service" "profile"). */}}
{{- define "loyalist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loyalist.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .service }}
{{- end }}

{{- define "loyalist.serviceName" -}}
{{- printf "%s-%s" (include "loyalist.fullname" .root) .service | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loyalist.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loyalist.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loyalist.secretName" -}}
{{- default (printf "%s-secrets" (include "loyalist.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "loyalist.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The stream services: their replicas share partitions through one consumer group each. */}}
{{- define "loyalist.streamServices" -}}
profile segmenter journeys notify
{{- end }}

{{/* One service's settings: the defaults deep-merged with its own block. */}}
{{- define "loyalist.serviceValues" -}}
{{- $svc := index .root.Values.services .service }}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.defaults) (deepCopy $svc)) }}
{{- end }}

{{/* LOYALIST_* settings shared by every service and the bootstrap Job (loyalist/settings.py). */}}
{{- define "loyalist.config" -}}
LOYALIST_NAMESPACE: {{ .Values.config.namespace | quote }}
LOYALIST_ENV: {{ .Values.config.env | quote }}
LOYALIST_HOST: "0.0.0.0"
LOYALIST_HOME: "/tmp/loyalist"
LOYALIST_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
LOYALIST_LOG_JSON: {{ .Values.config.logJson | quote }}
LOYALIST_KAFKA_HOST: {{ .Values.kafka.host | quote }}
LOYALIST_KAFKA_PORT: {{ .Values.kafka.port | quote }}
LOYALIST_KAFKA_PARTITIONS: {{ .Values.config.kafkaPartitions | quote }}
LOYALIST_CASSANDRA_HOSTS: {{ .Values.cassandra.hosts | quote }}
LOYALIST_CASSANDRA_PORT: {{ .Values.cassandra.port | quote }}
LOYALIST_CASSANDRA_REPLICATION_FACTOR: {{ .Values.config.cassandraReplicationFactor | quote }}
LOYALIST_REDIS_HOST: {{ .Values.redis.host | quote }}
LOYALIST_REDIS_PORT: {{ .Values.redis.port | quote }}
LOYALIST_REDIS_DB: {{ .Values.redis.db | quote }}
LOYALIST_SMTP_HOST: {{ .Values.smtp.host | quote }}
LOYALIST_SMTP_PORT: {{ .Values.smtp.port | quote }}
{{- $profileApi := index .Values.services "profile-api" | default dict }}
{{- range $name, $svc := .Values.services }}
{{- if not $svc.module }}
LOYALIST_{{ upper $name }}_PORT: {{ $svc.port | quote }}
{{- if and (eq $name "profile") $profileApi.enabled }}
LOYALIST_PROFILE_URL: {{ printf "http://%s:%v" (include "loyalist.serviceName" (dict "root" $ "service" "profile-api")) $profileApi.port | quote }}
{{- else }}
LOYALIST_{{ upper $name }}_URL: {{ printf "http://%s:%v" (include "loyalist.serviceName" (dict "root" $ "service" $name)) $svc.port | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.config.extraEnv }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end }}
