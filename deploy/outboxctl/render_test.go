package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// Values that broke the sed templating: & became the match, | ended sed's
// expression, " and : made invalid YAML, # started a comment.
var hostile = []string{
	"Tom & Jerry <welcome@example.com>",
	`"Ex" <welcome@example.com>`,
	"Ops: team <welcome@example.com>",
	"a|b <welcome@example.com>",
	"Team #1 <welcome@example.com>",
	`\1 ${PROJECT} 'x' {"k": [1]} --- <welcome@example.com>`,
	"true",
	"",
}

func renderArgs(mailFrom, file string) []string {
	return []string{"-set", "PROJECT=my-project", "-set", "REGION=europe-west1", "-set", "SQL_INSTANCE=outbox",
		"-set", "NETWORK=default", "-set", "SUBNET=default", "-set", "REDIS_CLUSTER=false",
		"-set", "STREAM_PARTITIONS=6",
		"-set", "IMAGE=europe-west1-docker.pkg.dev/my-project/outbox/relay@sha256:0123abcd",
		"-text", "MAIL_FROM=" + mailFrom, file}
}

// env collects every name/value pair of the rendered document.
func envOf(t *testing.T, rendered []byte) map[string]string {
	t.Helper()
	var doc any
	require.NoError(t, yaml.Unmarshal(rendered, &doc), "the rendered manifest is YAML:\n%s", rendered)
	env := map[string]string{}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if name, ok := v["name"].(string); ok {
				if value, ok := v["value"].(string); ok {
					env[name] = value
				}
			}
			for _, c := range v {
				walk(c)
			}
		case []any:
			for _, c := range v {
				walk(c)
			}
		}
	}
	walk(doc)
	return env
}

func TestRender(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("../cloudrun/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files)

	for _, from := range hostile {
		t.Run("keeps MAIL_FROM "+from+" as typed in every manifest", func(t *testing.T) {
			t.Parallel()
			for _, file := range files {
				var out bytes.Buffer
				require.NoError(t, runRender(renderArgs(from, file), &out), file)
				env := envOf(t, out.Bytes())
				if strings.HasSuffix(file, "sendemail.yaml") || strings.HasSuffix(file, "relay.yaml") {
					require.Equal(t, "false", env["REDIS_CLUSTER"], "a string, as Cloud Run wants")
					require.Equal(t, "6", env["STREAM_PARTITIONS"], "a string, the same for relay and sendemail")
				}
				if strings.HasSuffix(file, "sendemail.yaml") {
					require.Equal(t, from, env["MAIL_FROM"])
				}
				require.NotContains(t, out.String(), "${IMAGE}\"", file)
				var m map[string]any
				require.NoError(t, yaml.Unmarshal(out.Bytes(), &m))
				require.ElementsMatch(t, []string{"apiVersion", "kind", "metadata", "spec"}, keys(m), "no value adds a key")
			}
		})
	}

	t.Run("fills the identifiers, the JSON annotation included", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		require.NoError(t, runRender(renderArgs("x", "../cloudrun/relay.yaml"), &out))
		require.Contains(t, out.String(), `"my-project:europe-west1:outbox"`)
		require.Contains(t, out.String(), `europe-west1-docker.pkg.dev/my-project/outbox/relay@sha256:0123abcd`)
		require.Contains(t, out.String(), `[{\"network\":\"default\",\"subnetwork\":\"default\"}]`)
	})

	for _, tc := range []struct{ name, flag, value, want string }{
		{"a newline in MAIL_FROM", "-text", "MAIL_FROM=a\nb: c", "one line"},
		{"a carriage return in MAIL_FROM", "-text", "MAIL_FROM=a\rb", "one line"},
		{"a quote in a project", "-set", `PROJECT=my"project`, "plain name"},
		{"a space in a network", "-set", "NETWORK=my net", "plain name"},
		{"a lower-case name", "-set", "project=x", "NAME in capitals"},
	} {
		t.Run("refuses "+tc.name, func(t *testing.T) {
			t.Parallel()
			err := runRender([]string{tc.flag, tc.value, "../cloudrun/relay.yaml"}, &bytes.Buffer{})
			require.ErrorIs(t, err, errUsage)
			require.ErrorContains(t, err, tc.want)
		})
	}

	t.Run("refuses a placeholder without a value", func(t *testing.T) {
		t.Parallel()
		err := runRender([]string{"-set", "PROJECT=p", "../cloudrun/relay.yaml"}, &bytes.Buffer{})
		require.ErrorContains(t, err, "no value for")
		require.ErrorContains(t, err, "IMAGE")
	})
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestBudget(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("../cloudrun/*.yaml")
	require.NoError(t, err)

	t.Run("the manifests fit the Cloud SQL instance the README creates (max_connections 100)", func(t *testing.T) {
		t.Parallel()
		var out bytes.Buffer
		require.NoError(t, runBudget(append([]string{"-max-connections", "100"}, files...), &out))
		require.Contains(t, out.String(), "relay         2 instances × (4 pooled + 1 LISTEN) = 10")
		require.Contains(t, out.String(), "total 84 of max_connections 100")
	})

	t.Run("fails when the sum exceeds max_connections", func(t *testing.T) {
		t.Parallel()
		err := runBudget(append([]string{"-max-connections", "50"}, files...), &bytes.Buffer{})
		require.ErrorIs(t, err, errBudget)
	})
}

func TestExitStatus(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		args []string
		code int
	}{
		{"help prints the usage", []string{"help"}, 0},
		{"no command is a usage error", nil, 2},
		{"an unknown command is a usage error", []string{"frobnicate"}, 2},
		{"a bad flag is a usage error", []string{"render", "-nope"}, 2},
		{"a failure is 1", []string{"render", "does-not-exist.yaml"}, 1},
		{"a stray argument to purge is a usage error, not a purge", []string{"purge", "1h"}, 2},
		{"a stray argument to status is a usage error", []string{"status", "extra"}, 2},
		{"a negative count is a usage error", []string{"dlq", "list", "-count", "-1"}, 2},
		{"a replay without a selection is a usage error", []string{"replay"}, 2},
		{"a replay by time and by event id is a usage error", []string{"replay", "-since", "1h", "-event-id", "0b7e6a9e-3f0c-4c39-9a53-0e3c3c2f7d11"}, 2},
		{"a budget over the limit is 1", []string{"budget", "-max-connections", "1", "../cloudrun/relay.yaml"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var out, stderr bytes.Buffer
			code := exit(run(t.Context(), tc.args, &out), &stderr)
			require.Equal(t, tc.code, code, stderr.String())
			if tc.code == 0 {
				require.Contains(t, out.String(), "usage: outboxctl")
			}
		})
	}
}

func TestFailureMessageHasNoPassword(t *testing.T) {
	var stderr bytes.Buffer
	t.Setenv("REDIS_URL", "redis://:hunter2-s3cret@127.0.0.1:port/0")
	code := exit(run(t.Context(), []string{"status"}, &bytes.Buffer{}), &stderr)
	require.Equal(t, 1, code)
	require.Contains(t, stderr.String(), "redis")
	require.NotContains(t, stderr.String(), "hunter2")
}
