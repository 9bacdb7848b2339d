package httpjson

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("connection reset") }

func TestReadBodyRefusesExactlyWhatIsOverTheLimit(t *testing.T) {
	t.Parallel()
	const limit = 64 << 10
	for _, tt := range []struct {
		name   string
		body   io.Reader
		status int
	}{
		{"accepts a body of exactly the limit", strings.NewReader(strings.Repeat(" ", limit)), 0},
		{"refuses one byte past it with 413", strings.NewReader(strings.Repeat(" ", limit+1)), 413},
		{"refuses a body cut by MaxBytesReader with 413", http.MaxBytesReader(nil, io.NopCloser(strings.NewReader(strings.Repeat(" ", limit+10))), limit-1), 413},
		{"answers 400 to a body that cannot be read", failingReader{}, 400},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/", tt.body)
			r.Header.Set("Content-Type", "application/json; charset=UTF-8")
			body, err := ReadBody(r, limit)
			if tt.status == 0 {
				require.NoError(t, err)
				assert.Len(t, body, limit)
				return
			}
			var e *Error
			require.ErrorAs(t, err, &e)
			assert.Equal(t, tt.status, e.Status)
		})
	}
}

func TestWriteRawSendsTheBodyAndANewlineUnderItsContentLength(t *testing.T) {
	t.Parallel()
	for _, body := range []string{`{}`, `{"id":1,"email":"\u003cx\u003e@example.com"}`, strings.Repeat(`"a"`, 5000)} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			WriteRaw(w, http.StatusCreated, []byte(body))
		}))
		res, err := http.Get(srv.URL)
		require.NoError(t, err)
		got, err := io.ReadAll(res.Body)
		res.Body.Close()
		srv.Close()
		require.NoError(t, err)
		assert.Equal(t, body+"\n", string(got))
		assert.Equal(t, strconv.Itoa(len(body)+1), res.Header.Get("Content-Length"))
		assert.Equal(t, http.StatusCreated, res.StatusCode)
	}
}
