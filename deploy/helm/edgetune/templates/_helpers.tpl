{{/*
Names and labels shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "edgetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: fullnameOverride, else <release>-<chart> (just <release> when it
already holds the chart name). Truncated to leave room for suffixes such as "-mosquitto".
*/}}
{{- define "edgetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart name and version, for the helm.sh/chart label */}}
{{- define "edgetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "edgetune.labels" -}}
helm.sh/chart: {{ include "edgetune.chart" . }}
app.kubernetes.io/name: {{ include "edgetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgetune
{{- end }}

{{/* Selector labels of the aggregator. */}}
{{- define "edgetune.aggregator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: aggregator
{{- end }}

{{/* Selector labels of Mosquitto. */}}
{{- define "edgetune.mosquitto.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mosquitto
{{- end }}

{{/* Names of the resources. */}}
{{- define "edgetune.aggregator.fullname" -}}
{{- printf "%s-aggregator" (include "edgetune.fullname" .) }}
{{- end }}

{{- define "edgetune.mosquitto.fullname" -}}
{{- printf "%s-mosquitto" (include "edgetune.fullname" .) }}
{{- end }}

{{- define "edgetune.settings.fullname" -}}
{{- printf "%s-settings" (include "edgetune.fullname" .) }}
{{- end }}

{{- define "edgetune.checkpoints.fullname" -}}
{{- printf "%s-checkpoints" (include "edgetune.fullname" .) }}
{{- end }}

{{/* The Secret with the broker credentials: broker.existingSecret or the chart's own. */}}
{{- define "edgetune.broker.secretName" -}}
{{- if .Values.broker.existingSecret }}
{{- .Values.broker.existingSecret }}
{{- else }}
{{- printf "%s-broker" (include "edgetune.fullname" .) }}
{{- end }}
{{- end }}

{{/* The broker URL the aggregator connects to (EDGETUNE_BROKER_URL). */}}
{{- define "edgetune.brokerUrl" -}}
{{- if .Values.mosquitto.enabled }}
{{- include "edgetune.tls.check" . }}
{{- if include "edgetune.aggregator.tls" . }}
{{- printf "mqtts://%s:%d" (include "edgetune.mosquitto.fullname" .) (int .Values.broker.tls.port) }}
{{- else if .Values.broker.tls.enabled }}
{{- printf "mqtt://%s:%d" (include "edgetune.mosquitto.internalName" .) (int .Values.mosquitto.port) }}
{{- else }}
{{- printf "mqtt://%s:%d" (include "edgetune.mosquitto.fullname" .) (int .Values.mosquitto.port) }}
{{- end }}
{{- else if .Values.externalBroker.url }}
{{- if .Values.broker.tls.enabled }}
{{- fail "broker.tls is the chart's Mosquitto's TLS: with an external broker give externalBroker.url as mqtts://host:8883 (a private CA: mount it with aggregator.extraVolumes and point EDGETUNE_CA_FILE at it with aggregator.extraEnv)" }}
{{- end }}
{{- .Values.externalBroker.url }}
{{- else }}
{{- fail "set externalBroker.url (e.g. mqtts://mqtt.example.com:8883) when mosquitto.enabled is false" }}
{{- end }}
{{- end }}

{{/*
TLS of the chart's Mosquitto (broker.tls). Mosquitto's plain listener (mosquitto.port) stays
without TLS, or with keepPlainListener; then only on the cluster-internal Service. The aggregator
connects with mqtts:// and the CA unless it may use that plain listener.
*/}}
{{- define "edgetune.mosquitto.plainListener" -}}
{{- if or (not .Values.broker.tls.enabled) .Values.broker.tls.keepPlainListener }}true{{ end }}
{{- end }}

{{/* "true" when the aggregator connects to the chart's Mosquitto over TLS. */}}
{{- define "edgetune.aggregator.tls" -}}
{{- if and .Values.mosquitto.enabled .Values.broker.tls.enabled (not .Values.broker.tls.keepPlainListener) }}true{{ end }}
{{- end }}

{{/* The cluster-internal Service of the plain listener, when TLS keeps one. */}}
{{- define "edgetune.mosquitto.internalName" -}}
{{- printf "%s-internal" (include "edgetune.mosquitto.fullname" .) }}
{{- end }}

{{/* The Secret with the broker's certificate: broker.tls.existingSecret or cert-manager's. */}}
{{- define "edgetune.tls.secretName" -}}
{{- if .Values.broker.tls.existingSecret }}
{{- .Values.broker.tls.existingSecret }}
{{- else }}
{{- printf "%s-tls" (include "edgetune.mosquitto.fullname" .) }}
{{- end }}
{{- end }}

{{/* Where the aggregator finds the broker's CA (EDGETUNE_CA_FILE). */}}
{{- define "edgetune.caFile" -}}
/etc/edgetune/tls/ca.crt
{{- end }}

{{/*
The aggregator's client certificate (mutual TLS): the Secret it comes from, or nothing when the
aggregator presents none. aggregator.tls.existingSecret, else, with the chart's Mosquitto on
mutual TLS and its certificate from cert-manager, the Certificate <fullname>-aggregator-tls from
the same issuer. Only over TLS (ConnectionSettings refuses a client certificate on mqtt://).
*/}}
{{- define "edgetune.aggregator.clientCertSecret" -}}
{{- $tls := .Values.broker.tls }}
{{- $issuer := $tls.certManager.issuerRef | default dict }}
{{- $overTls := or (include "edgetune.aggregator.tls" .) (and (not .Values.mosquitto.enabled) (hasPrefix "mqtts://" (toString .Values.externalBroker.url))) }}
{{- if .Values.aggregator.tls.existingSecret }}
{{- if not $overTls }}
{{- fail (printf "aggregator.tls.existingSecret: the aggregator connects without TLS (%s), where it cannot present a client certificate: %s" (include "edgetune.brokerUrl" .) (ternary "with broker.tls.keepPlainListener it uses the plain listener; set keepPlainListener=false for mutual TLS, or drop aggregator.tls.existingSecret" "enable broker.tls (or give an mqtts:// externalBroker.url), or drop aggregator.tls.existingSecret" (and .Values.mosquitto.enabled $tls.enabled))) }}
{{- end }}
{{- .Values.aggregator.tls.existingSecret }}
{{- else if and (include "edgetune.aggregator.tls" .) $tls.requireClientCertificate (not $tls.existingSecret) $issuer.name }}
{{- include "edgetune.aggregator.certificateName" . }}
{{- end }}
{{- end }}

{{/* The Certificate (and its Secret) of the aggregator's client certificate from cert-manager. */}}
{{- define "edgetune.aggregator.certificateName" -}}
{{- printf "%s-tls" (include "edgetune.aggregator.fullname" .) }}
{{- end }}

{{/* Where the aggregator's client certificate and key are mounted (EDGETUNE_CERT_FILE/KEY_FILE). */}}
{{- define "edgetune.aggregator.clientCertDir" -}}
/etc/edgetune/client
{{- end }}

{{/* Where the fleet's signing key and public keys are mounted (EDGETUNE_SIGNING_KEY/FLEET_KEYS). */}}
{{- define "edgetune.aggregator.signingDir" -}}
/etc/edgetune/signing
{{- end }}

{{/*
What the aggregator publishes for devices that only serve (aggregator.publishModel, its
EDGETUNE_PUBLISH_MODEL), checked: a bare `off` in a values file is YAML's false.
*/}}
{{- define "edgetune.publishModel" -}}
{{- $publish := .Values.aggregator.publishModel | default "off" | toString }}
{{- if ne $publish "off" }}
{{- $envNames := list }}
{{- range .Values.aggregator.extraEnv }}{{ $envNames = append $envNames .name }}{{ end }}
{{- if not (or .Values.aggregator.signing.existingSecret (has "EDGETUNE_SIGNING_KEY" $envNames) (hasKey .Values.aggregator.extraSettings "EDGETUNE_SIGNING_KEY")) }}
{{- fail (printf "aggregator.publishModel=%s: devices that serve (edgetune-agent serve) take only signed models: give the fleet's signing key in aggregator.signing.existingSecret (signing.key and fleet-keys.pem)" $publish) }}
{{- end }}
{{- if eq (toString (index .Values.aggregator.extraSettings "EDGETUNE_MODE" | default "federated")) "split" }}
{{- fail "aggregator.publishModel: only the federated mode publishes a model for serving devices; set it to off with EDGETUNE_MODE=split" }}
{{- end }}
{{- end }}
{{- $publish }}
{{- end }}

{{/* The broker Service's names, which its certificate must hold. */}}
{{- define "edgetune.tls.serviceNames" -}}
{{- $svc := include "edgetune.mosquitto.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.broker.tls.certManager.clusterDomain) | toJson }}
{{- end }}

{{/* broker.tls values that cannot work together, refused with what to set. */}}
{{- define "edgetune.tls.check" -}}
{{- $tls := .Values.broker.tls }}
{{- if $tls.enabled }}
{{- $issuer := $tls.certManager.issuerRef | default dict }}
{{- if and $tls.existingSecret $issuer.name }}
{{- fail "broker.tls: give the certificate either as broker.tls.existingSecret or through broker.tls.certManager.issuerRef, not both" }}
{{- end }}
{{- if not (or $tls.existingSecret $issuer.name) }}
{{- fail "broker.tls.enabled needs the broker's certificate: set broker.tls.certManager.issuerRef (e.g. {name: fleet-ca, kind: ClusterIssuer}) or broker.tls.existingSecret (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- if and $tls.requireClientCertificate (not $tls.keepPlainListener) (not .Values.aggregator.tls.existingSecret) (not $issuer.name) }}
{{- fail "broker.tls.requireClientCertificate: the aggregator connects to the mutual-TLS listener and needs a client certificate signed by the broker's CA: set aggregator.tls.existingSecret (a Secret with tls.crt and tls.key, e.g. `kubectl create secret tls fleet-aggregator --cert=fleet/aggregator/client.crt --key=fleet/aggregator/client.key` from `edgetune provision init`), or give the broker's certificate through broker.tls.certManager.issuerRef (the chart then asks the same issuer for the aggregator's), or set broker.tls.keepPlainListener=true to connect it through the cluster-internal plain listener" }}
{{- end }}
{{- if and $tls.keepPlainListener (eq (int $tls.port) (int .Values.mosquitto.port)) }}
{{- fail "broker.tls.port and mosquitto.port are the same port: give the TLS listener its own (8883)" }}
{{- end }}
{{- else if $tls.requireClientCertificate }}
{{- fail "broker.tls.requireClientCertificate needs broker.tls.enabled (mutual TLS is a TLS listener's)" }}
{{- end }}
{{- end }}

{{/*
The broker's packet limit (maxPacketBytes): Mosquitto's max_packet_size and the aggregator's
EDGETUNE_MAX_PACKET_BYTES, so that the two cannot differ.
*/}}
{{- define "edgetune.maxPacketBytes" -}}
{{- if hasKey .Values.mosquitto "maxPacketSize" }}
{{- fail "mosquitto.maxPacketSize is now maxPacketBytes (top level): it sets the aggregator's EDGETUNE_MAX_PACKET_BYTES too" }}
{{- end }}
{{- int .Values.maxPacketBytes }}
{{- end }}

{{/* The aggregator image reference. */}}
{{- define "edgetune.aggregator.image" -}}
{{- printf "%s:%s" .Values.aggregator.image.repository (default .Chart.AppVersion .Values.aggregator.image.tag) }}
{{- end }}

{{/* The Mosquitto image reference. */}}
{{- define "edgetune.mosquitto.image" -}}
{{- printf "%s:%s" .Values.mosquitto.image.repository (toString .Values.mosquitto.image.tag) }}
{{- end }}

{{/* Where the checkpoint volume is mounted in the aggregator container. */}}
{{- define "edgetune.checkpointsMount" -}}
/var/lib/edgetune/checkpoints
{{- end }}

{{/*
The training run (aggregator.run), checked: it names the Job and the run's output dir.
*/}}
{{- define "edgetune.run" -}}
{{- $run := toString .Values.aggregator.run }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$" $run) }}
{{- fail (printf "aggregator.run: %q is not a run name: use 1-20 lower-case letters, digits and '-', starting and ending with a letter or digit (e.g. run1)" $run) }}
{{- end }}
{{- $run }}
{{- end }}

{{/* The aggregator Job of this run: <fullname>-aggregator-<run>. */}}
{{- define "edgetune.aggregator.jobName" -}}
{{- $name := printf "%s-%s" (include "edgetune.aggregator.fullname" .) (include "edgetune.run" .) }}
{{- if gt (len $name) 63 }}
{{- fail (printf "the aggregator Job name %q is longer than 63 characters: shorten aggregator.run or fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
Where the run's checkpoints go (EDGETUNE_OUTPUT_DIR): a folder per run on the checkpoint
volume, so that a new run starts afresh instead of resuming the last one's checkpoint.
*/}}
{{- define "edgetune.outputDir" -}}
{{- printf "%s/%s" (include "edgetune.checkpointsMount" .) (include "edgetune.run" .) }}
{{- end }}

{{/*
storageClassName for a claim: nothing when empty (the cluster default), "" when "-".
Call with the persistence dict.
*/}}
{{- define "edgetune.storageClass" -}}
{{- if .storageClass }}
{{- if eq "-" .storageClass }}
storageClassName: ""
{{- else }}
storageClassName: {{ .storageClass | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A broker password from values, checked. The chart does not generate passwords (a random one,
or a `lookup` of the live Secret, would differ on every offline render, so that a GitOps sync
would rotate them all): set them, or name an existing Secret in broker.existingSecret.
Call with (list "<what it is>" "<the value's path>" <value>).
*/}}
{{- define "edgetune.password" -}}
{{- $what := index . 0 }}
{{- $path := index . 1 }}
{{- $value := index . 2 | default "" | toString }}
{{- if not $value }}
{{- fail (printf "%s has no password: set %s (e.g. from `openssl rand -hex 16`; the agents' in a values file, as --set on a list index replaces the whole list) or give the broker credentials in an existing Secret (broker.existingSecret); the chart does not generate passwords, so that every render gives the same Secret" $what $path) }}
{{- end }}
{{- if regexMatch "[\\r\\n]" $value }}
{{- fail (printf "%s: the password holds a line break" $path) }}
{{- end }}
{{- $value }}
{{- end }}

{{/* The aggregator's ServiceAccount: serviceAccount.name, else <fullname>-aggregator when the
chart creates it, else the namespace's default. */}}
{{- define "edgetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgetune.aggregator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}
