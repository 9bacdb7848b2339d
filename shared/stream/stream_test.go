package stream

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestNewClientNeverRepeatsAPasswordItCannotParse(t *testing.T) {
	t.Parallel()
	for _, url := range []string{
		"rediss://default:AbC+s3cret/xyz=@10.0.0.3:6378/0",
		"redis://u:s3cret#pw@127.0.0.1:2/0",
		"redis://:s3cret/pw@127.0.0.1:2/0",
		"redis://u:s3cret?pw@127.0.0.1:2/0",
	} {
		_, err := NewClient(url, false)
		require.ErrorIs(t, err, ErrBadURL, url)
		require.NotContains(t, err.Error(), "s3cret", url)
	}
}
